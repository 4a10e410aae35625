//! The Auth & Session Service's logic: one method per request, each a short sequence of
//! checks and one (sometimes two) durable transactions. Synchronous: the network loop runs it
//! on blocking threads, because redb commits fsync and argon2 takes tens of milliseconds.

use std::net::IpAddr;
use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng};
use libp2p::PeerId;
use libp2p::identity::ed25519;
use meshgram_node::crypto::cert::{
    AccountKind, CERT_CLOCK_SKEW_SECS, CertBody, RelayCert, Revocation, RevocationBody, Revoked, SessionCert,
};
use meshgram_node::crypto::identity::DeviceKeys;
use meshgram_node::ids::{BOT_TOKEN_SECRET_LEN, BotToken, Phone, SessionId, UserId, Username};
use meshgram_node::net::codec::FrameError;
use meshgram_node::proto::{
    Account, AuthRequest, AuthResponse, BackupRecord, BotCommandInfo, DeviceCard, ErrorCode as Code, LookupQuery,
    MAX_BACKUP_POINTER_BYTES, MAX_BACKUPS_KEPT, MAX_CHANNEL_LINK_CHARS, MAX_DEVICE_NAME_CHARS,
    MAX_DEVICES_PER_QUESTION, MAX_NAME_CHARS, MAX_PASSWORD_BYTES, MAX_REVOCATIONS_PER_ANSWER, UserCard, WireError,
};
use rand::Rng;

use crate::code_sender::CodeSender;
use crate::config::Limits;
use crate::defaults::{LAST_SEEN_RESOLUTION_SECS, MAX_BOTS_PER_OWNER, WEBHOOK_BUSY_RETRY_SECS};
use crate::metrics::Metrics;
use crate::store::{
    ChannelName, CodeRecord, PasswordGuard, PhoneGuard, Store, StoreError, StoredAccount, StoredSession, Tables,
};
use meshgram_node::server::limits::RateLimiter;

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        // The client learns only that we failed (and whether it may pass); the operator gets
        // the cause.
        if let StoreError::Unavailable(why) = &e {
            tracing::warn!(error = %why, "gateway database unavailable");
            return WireError::flood_wait(DATABASE_AWAY_RETRY_SECS, "the gateway's database is unavailable");
        }
        tracing::error!(error = %e, "gateway store failure");
        WireError::new(Code::Internal, "internal error; try again later")
    }
}

type AuthResult<T> = Result<T, WireError>;

/// After the database was unavailable, clients wait this long before trying again.
const DATABASE_AWAY_RETRY_SECS: u64 = 1;

/// A relay whose admission the operator revoked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RevokedRelay {
    pub relay: PeerId,
    /// Unix seconds; the first revocation's time if it was revoked before.
    pub revoked_at: u64,
}

/// A bot and its freshly issued token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedBotToken {
    pub bot: Account,
    pub token: String,
}

/// What a `FLOOD_WAIT` after too many wrong codes from one device says.
const WRONG_CODES_FROM_DEVICE: &str = "wrong codes for this number from this device";

/// A login code guessed by `device` for `phone`, from `ip` if per-address limits apply.
struct CodeGuess<'a> {
    phone: &'a Phone,
    device: &'a PeerId,
    ip: Option<&'a str>,
    code: &'a str,
    /// Set by [`AuthService::check_code`] when the code was wrong: the address is charged
    /// once the transaction is over, since a transaction may run more than once.
    wrong: std::cell::Cell<bool>,
}

/// The gateway's state and rules.
#[derive(Debug)]
pub struct AuthService {
    store: Store,
    signer: ed25519::Keypair,
    /// Key for hashing login codes, derived from the gateway key: a leaked database alone does
    /// not let anyone test codes offline.
    code_key: [u8; 32],
    /// Key for hashing bot token secrets, likewise.
    token_key: [u8; 32],
    sender: CodeSender,
    limits: Limits,
    send_code_limiter: RateLimiter,
    sign_in_limiter: RateLimiter,
    lookup_limiter: RateLimiter,
    send_code_peer_limiter: RateLimiter,
    send_code_ip_limiter: RateLimiter,
    send_code_global_limiter: RateLimiter,
    /// Wrong login codes per IP address, whatever the devices and phones.
    wrong_code_ip_limiter: RateLimiter,
    /// Codes being handed to the SMS webhook at once.
    webhook_slots: tokio::sync::Semaphore,
    runtime: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
}

impl AuthService {
    /// Builds the service. `runtime` is used to run the webhook from blocking threads.
    pub fn new(
        store: Store,
        signer: ed25519::Keypair,
        sender: CodeSender,
        limits: Limits,
        runtime: tokio::runtime::Handle,
        metrics: Arc<Metrics>,
    ) -> Self {
        let secret = signer.secret();
        let code_key = blake3::derive_key("meshgram gateway 2026 login code hash", secret.as_ref());
        let token_key = blake3::derive_key("meshgram gateway 2026 bot token hash", secret.as_ref());
        AuthService {
            store,
            signer,
            code_key,
            token_key,
            sender,
            send_code_limiter: RateLimiter::new(limits.send_code_burst, limits.send_code_refill_secs),
            sign_in_limiter: RateLimiter::new(limits.sign_in_burst, limits.sign_in_refill_secs),
            lookup_limiter: RateLimiter::per_second(limits.lookup_burst, limits.lookups_per_second),
            send_code_peer_limiter: RateLimiter::new(
                limits.send_code_device_burst,
                limits.send_code_device_refill_secs,
            ),
            send_code_ip_limiter: RateLimiter::new(limits.send_code_ip_burst, limits.send_code_ip_refill_secs),
            wrong_code_ip_limiter: RateLimiter::new(limits.wrong_code_ip_burst, limits.wrong_code_ip_refill_secs),
            webhook_slots: tokio::sync::Semaphore::new(limits.max_webhook_deliveries as usize),
            send_code_global_limiter: RateLimiter::per_second(
                limits.send_codes_per_second.saturating_mul(10),
                limits.send_codes_per_second,
            ),
            limits,
            runtime,
            metrics,
        }
    }

    /// Accounts and active sessions, for `/metrics`.
    pub fn counts(&self) -> Result<(u64, u64), crate::store::StoreError> {
        self.store.counts()
    }

    /// The gateway's public signing key.
    pub fn public_key(&self) -> ed25519::PublicKey {
        self.signer.public()
    }

    /// Answers one request from `peer` at unix time `now`. Never panics on client input.
    pub fn handle(&self, peer: PeerId, request: Result<AuthRequest, FrameError>, now: u64) -> AuthResponse {
        self.handle_from(peer, None, request, now)
    }

    /// [`AuthService::handle`], knowing the IP address the request came from.
    pub fn handle_from(
        &self,
        peer: PeerId,
        ip: Option<IpAddr>,
        request: Result<AuthRequest, FrameError>,
        now: u64,
    ) -> AuthResponse {
        let started = std::time::Instant::now();
        let (kind, result) = match request {
            Err(frame) => ("malformed", Err(WireError::new(Code::BadRequest, frame.to_string()))),
            Ok(request) => (request.kind(), self.dispatch(peer, ip, request, now)),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => e.code.to_string(),
        };
        self.metrics.count_request(kind, &outcome, started.elapsed());
        result.unwrap_or_else(AuthResponse::Error)
    }

    fn dispatch(&self, peer: PeerId, ip: Option<IpAddr>, request: AuthRequest, now: u64) -> AuthResult<AuthResponse> {
        match request {
            AuthRequest::SendCode { phone } => self.send_code(peer, ip, &phone, now),
            AuthRequest::SignIn { phone, code, device, device_name, password } => {
                self.sign_in(peer, ip, &phone, &code, device, device_name, password, now)
            }
            AuthRequest::BotSignIn { token, device, device_name } => {
                self.bot_sign_in(peer, &token, device, device_name, now)
            }
            AuthRequest::RenewCert => self.renew_cert(peer, now),
            AuthRequest::GetMe => self.get_me(peer, now),
            AuthRequest::SetProfile { username, name } => self.set_profile(peer, username, name, now),
            AuthRequest::SetPassword { current, new } => self.set_password(peer, current, new, now),
            AuthRequest::Lookup(query) => self.lookup(peer, &query, now),
            AuthRequest::ListSessions => self.list_sessions(peer, now),
            AuthRequest::RevokeSession { session_id } => self.revoke_session(peer, session_id, now),
            AuthRequest::RevokeOtherSessions => self.revoke_other_sessions(peer, now),
            AuthRequest::CreateBot { username, name } => {
                let owner = self.store.read(|t| self.authed_user(t, &peer, now))?;
                let issued = self.create_bot(Some(owner.user_id), &username, &name, now)?;
                Ok(AuthResponse::BotToken { bot: issued.bot, token: issued.token })
            }
            AuthRequest::ListBots => {
                let bots = self.store.read(|t| {
                    let owner = self.authed_user(t, &peer, now)?;
                    Ok::<_, WireError>(t.bots_of(owner.user_id)?)
                })?;
                Ok(AuthResponse::Bots(bots.iter().map(StoredAccount::to_account).collect()))
            }
            AuthRequest::RevokeBotToken { bot } => {
                let owner = self.store.read(|t| self.authed_user(t, &peer, now))?;
                let issued = self.revoke_bot_token(Some(owner.user_id), bot, now)?;
                Ok(AuthResponse::BotToken { bot: issued.bot, token: issued.token })
            }
            AuthRequest::Revocations { since, relay_cert } => self.revocations(peer, since, &relay_cert, now),
            AuthRequest::DevicesExist { devices, relay_cert } => self.devices_exist(peer, &devices, &relay_cert, now),
            AuthRequest::PutBackup { backup, keep } => self.put_backup(peer, backup, keep, now),
            AuthRequest::SetBotCommands { commands } => {
                BotCommandInfo::check_all(&commands).map_err(|why| WireError::new(Code::BadRequest, why))?;
                self.store.write(|t| {
                    let me = self.authed_account(t, &peer, now)?;
                    if me.kind != AccountKind::Bot {
                        return Err(WireError::new(Code::Forbidden, "only a bot lists commands"));
                    }
                    t.put_bot_commands(me.user_id, &commands)?;
                    Ok::<_, WireError>(())
                })?;
                Ok(AuthResponse::Done)
            }
            AuthRequest::BotCommands { bot } => {
                let commands = self.store.read(|t| {
                    self.authed(t, &peer, now)?;
                    t.account(bot)?
                        .filter(|a| a.kind == AccountKind::Bot)
                        .ok_or_else(|| WireError::new(Code::NotFound, "no such bot"))?;
                    Ok::<_, WireError>(t.bot_commands(bot)?)
                })?;
                Ok(AuthResponse::BotCommands(commands))
            }
            AuthRequest::SetChannelName { name, link } => {
                if link.chars().count() > MAX_CHANNEL_LINK_CHARS {
                    let why = format!("a channel link has at most {MAX_CHANNEL_LINK_CHARS} characters");
                    return Err(WireError::new(Code::BadRequest, why));
                }
                self.store.write(|t| {
                    let me = self.authed_user(t, &peer, now)?;
                    // A channel's name is a username no account may take, and no other user's.
                    let name = valid_username(&name, AccountKind::User)?;
                    let held = t.channel_name(&name)?;
                    let held_by_other = held.as_ref().is_some_and(|held| held.owner != me.user_id);
                    if link.is_empty() {
                        return match held {
                            Some(_) if held_by_other => {
                                Err(WireError::new(Code::Forbidden, format!("{name} is another user's channel")))
                            }
                            Some(_) => Ok(t.remove_channel_name(&name)?),
                            None => Err(WireError::new(Code::NotFound, format!("no channel is called {name}"))),
                        };
                    }
                    if t.username_holder(&name)?.is_some() || held_by_other {
                        return Err(WireError::new(Code::UsernameOccupied, format!("{name} is already taken")));
                    }
                    t.put_channel_name(&name, &ChannelName { owner: me.user_id, link: link.clone() })?;
                    Ok::<_, WireError>(())
                })?;
                Ok(AuthResponse::Done)
            }
            AuthRequest::ChannelByName { name } => {
                let link = self.store.read(|t| {
                    self.authed(t, &peer, now)?;
                    let unknown = || WireError::new(Code::NotFound, format!("no channel is called @{name}"));
                    let name: Username = name.parse().map_err(|_| unknown())?;
                    Ok::<_, WireError>(t.channel_name(&name)?.ok_or_else(unknown)?.link)
                })?;
                Ok(AuthResponse::ChannelLink(link))
            }
            AuthRequest::ListBackups => {
                let backups = self.store.read(|t| {
                    let me = self.authed_user(t, &peer, now)?;
                    Ok::<_, WireError>(t.backups(me.user_id)?)
                })?;
                Ok(AuthResponse::Backups(backups))
            }
        }
    }

    // ---- sign-in ----

    /// `SendCode`: rate-limit, store a fresh code, deliver it.
    fn send_code(&self, peer: PeerId, ip: Option<IpAddr>, phone: &Phone, now: u64) -> AuthResult<AuthResponse> {
        // A slow SMS provider holds a delivery slot per code: when all are taken, say so at
        // once rather than tie up the gateway's request threads (and before any limit counts
        // this request).
        let _delivering = match &self.sender {
            CodeSender::Webhook { .. } => Some(self.webhook_slots.try_acquire().map_err(|_| {
                WireError::flood_wait(WEBHOOK_BUSY_RETRY_SECS, "code requests while the SMS provider is slow")
            })?),
            CodeSender::File(_) => None,
        };
        // Every code costs an SMS: limited per number, per asking device, per address and
        // overall, so that nobody pumps texts through us to numbers of their choosing.
        if let Some(ip) = self.limited_ip(ip) {
            self.send_code_ip_limiter
                .check(&ip.to_string(), now)
                .map_err(|s| WireError::flood_wait(s, "code requests from this address"))?;
        }
        self.take_shared(&self.send_code_limiter, "send-code", phone.as_str(), now, "code requests for this number")?;
        self.send_code_peer_limiter
            .check(&peer.to_string(), now)
            .map_err(|s| WireError::flood_wait(s, "code requests from this device"))?;
        self.send_code_global_limiter
            .check("all", now)
            .map_err(|s| WireError::flood_wait(s, "code requests; the gateway is busy"))?;
        let code = self.random_code();
        self.store.write(|t| {
            self.phone_unlocked(t, phone, now)?;
            let old = t.code(phone, &peer)?;
            if let Some(old) = &old
                && old.locked_until > now
            {
                return Err(WireError::flood_wait(old.locked_until - now, WRONG_CODES_FROM_DEVICE));
            }
            // Wrong attempts count per phone and device, not per code: asking for a new code
            // must not buy more guesses. They are forgotten after a lockout, or a lockout
            // period after the last code expired; so are other devices' records for the phone.
            let lockout = self.limits.code_lockout_secs;
            t.remove_stale_codes(phone, &|o| now >= o.locked_until && now >= o.expires_at + lockout)?;
            let carried =
                old.filter(|o| o.locked_until == 0 && now < o.expires_at + lockout).map_or(0, |o| o.wrong_attempts);
            let record = CodeRecord {
                code_hash: *self.code_hash(&code).as_bytes(),
                expires_at: now + self.limits.code_ttl_secs,
                wrong_attempts: carried,
                locked_until: 0,
            };
            t.put_code(phone, &peer, &record)?;
            Ok(())
        })?;
        let delivered = self.sender.deliver(&self.runtime, phone, &code, now);
        self.metrics.count_code(self.sender.kind(), delivered.is_ok());
        if let Err(e) = delivered {
            tracing::warn!(error = %e, phone = %phone.masked(), "login code not delivered");
            self.store.write(|t| t.remove_code(phone, &peer))?;
            return Err(WireError::new(
                Code::CodeDeliveryFailed,
                "the login code could not be delivered; try again later",
            ));
        }
        tracing::info!(phone = %phone.masked(), "login code sent");
        Ok(AuthResponse::CodeSent { expires_in_secs: self.limits.code_ttl_secs, code_length: self.limits.code_length })
    }

    /// `SignIn`: check the code (counting wrong tries durably), then the 2FA password if any,
    /// then consume the code and create the account and session in one transaction.
    #[allow(clippy::too_many_arguments)] // the request's fields, passed through
    fn sign_in(
        &self,
        peer: PeerId,
        ip: Option<IpAddr>,
        phone: &Phone,
        code: &str,
        device: DeviceKeys,
        device_name: String,
        password: Option<String>,
        now: u64,
    ) -> AuthResult<AuthResponse> {
        self.take_shared(&self.sign_in_limiter, "sign-in", &peer.to_string(), now, "sign-in attempts")?;
        check_device(&peer, &device, &device_name)?;
        let ip = self.limited_ip(ip).map(|ip| ip.to_string());
        if let Some(ip) = &ip {
            self.wrong_code_ip_limiter
                .wait(ip, now)
                .map_err(|s| WireError::flood_wait(s, "wrong codes from this address"))?;
        }
        let guess = CodeGuess { phone, device: &peer, ip: ip.as_deref(), code, wrong: std::cell::Cell::new(false) };
        // Commit even when the code is wrong: the attempt counters must survive.
        let guarded = self.store.write(|t| {
            Ok::<_, WireError>(match self.check_code(t, &guess, now)? {
                Err(e) => Err(e),
                Ok(()) => Ok(t.account_by_phone(phone)?.and_then(|a| Some((a.user_id, a.password_hash?)))),
            })
        });
        self.charge_wrong_code(&guess, now);
        let guarded = guarded??;
        if let Some((user, hash)) = guarded {
            let password = password.ok_or_else(|| {
                WireError::new(
                    Code::SessionPasswordNeeded,
                    "this account is protected by a password; send it with the code",
                )
            })?;
            self.check_password(user, &password, &hash, now)?;
        }
        let signed_in = self.store.write(|t| {
            if let Err(e) = self.check_code(t, &guess, now)? {
                return Ok(Err(e));
            }
            t.remove_code(phone, &peer)?;
            t.put_phone_guard(phone, &PhoneGuard::default())?;
            let (account, new_account) = match t.account_by_phone(phone)? {
                Some(account) => (account, false),
                None => {
                    let account = StoredAccount {
                        user_id: t.next_user_id()?,
                        kind: AccountKind::User,
                        phone: Some(phone.clone()),
                        username: None,
                        name: String::new(),
                        password_hash: None,
                        owner: None,
                        created_at: now,
                    };
                    t.put_account(&account)?;
                    (account, true)
                }
            };
            let session = self.new_session(t, &account, peer, device.clone(), device_name.clone(), now)?;
            Ok::<_, WireError>(Ok((account, session, new_account)))
        });
        self.charge_wrong_code(&guess, now);
        let (account, session, new_account) = signed_in??;
        tracing::info!(user = %account.user_id, session = %session.session_id, new_account, "signed in");
        Ok(AuthResponse::SignedIn { account: account.to_account(), cert: self.issue_cert(&session, now), new_account })
    }

    /// Checks a guess against the code its device asked for. The outer `Result` is a storage
    /// failure (abort); the inner one a refusal whose side effects (attempt counters, lockouts)
    /// must be committed.
    ///
    /// Wrong guesses lock out their source: the device, for this phone, after
    /// `max_code_attempts`, and the address after `wrong_code_ip_burst` (whatever the phones and
    /// devices). Devices are free, so the phone also counts every device's wrong guesses, and
    /// takes none for a while after `max_code_attempts_per_phone`: far more than one address
    /// gets to make, so that locking a number out takes many addresses.
    fn check_code(&self, t: &mut dyn Tables, guess: &CodeGuess<'_>, now: u64) -> AuthResult<AuthResult<()>> {
        let (phone, device) = (guess.phone, guess.device);
        guess.wrong.set(false);
        if let Err(locked) = self.phone_unlocked(t, phone, now) {
            return Ok(Err(locked));
        }
        let Some(mut record) = t.code(phone, device)? else {
            return Ok(Err(WireError::new(
                Code::PhoneCodeExpired,
                "no valid code for this number on this device: it was never sent, already used, or expired; \
                 request a new one",
            )));
        };
        if record.locked_until > now {
            return Ok(Err(WireError::flood_wait(record.locked_until - now, WRONG_CODES_FROM_DEVICE)));
        }
        if record.expires_at <= now {
            t.remove_code(phone, device)?;
            return Ok(Err(WireError::new(Code::PhoneCodeExpired, "the code has expired; request a new one")));
        }
        // blake3::Hash equality is constant-time.
        if self.code_hash(guess.code.trim()) == blake3::Hash::from_bytes(record.code_hash) {
            return Ok(Ok(()));
        }
        let limits = &self.limits;
        guess.wrong.set(true);
        let mut guard = t.phone_guard(phone)?;
        if now >= guard.last_wrong_at.saturating_add(limits.code_lockout_secs) {
            guard.wrong = 0;
        }
        guard.wrong += 1;
        guard.last_wrong_at = now;
        if guard.wrong >= limits.max_code_attempts_per_phone {
            tracing::warn!(phone = %phone.masked(), "wrong codes from many devices; the number takes none for a while");
            guard = PhoneGuard { wrong: 0, last_wrong_at: now, locked_until: now + limits.code_lockout_secs };
        }
        t.put_phone_guard(phone, &guard)?;
        record.wrong_attempts += 1;
        let refusal = if record.wrong_attempts >= limits.max_code_attempts {
            // Burn the code and lock this device out of this number for a while.
            record.locked_until = now + limits.code_lockout_secs;
            record.expires_at = now;
            WireError::flood_wait(limits.code_lockout_secs, WRONG_CODES_FROM_DEVICE)
        } else {
            WireError::new(Code::PhoneCodeInvalid, "the code is wrong")
        };
        t.put_code(phone, device, &record)?;
        Ok(Err(refusal))
    }

    /// Charges the guess's address for a wrong code, once its transaction is over (checked
    /// against `wait` in `sign_in`, before the guess).
    fn charge_wrong_code(&self, guess: &CodeGuess<'_>, now: u64) {
        if guess.wrong.get()
            && let Some(ip) = guess.ip
        {
            let _ = self.wrong_code_ip_limiter.check(ip, now);
        }
    }

    /// Refuses while `phone` is locked out for wrong codes from many devices.
    fn phone_unlocked(&self, t: &mut dyn Tables, phone: &Phone, now: u64) -> AuthResult<()> {
        let guard = t.phone_guard(phone)?;
        if guard.locked_until > now {
            return Err(WireError::flood_wait(guard.locked_until - now, "wrong codes for this number"));
        }
        Ok(())
    }

    /// The address a request came from, if per-address limits apply to it (loopback only with
    /// `limit_loopback`).
    fn limited_ip(&self, ip: Option<IpAddr>) -> Option<IpAddr> {
        ip.filter(|ip| self.limits.limit_loopback || !ip.is_loopback())
    }

    /// `BotSignIn`: the token's secret must match the stored hash.
    fn bot_sign_in(
        &self,
        peer: PeerId,
        token: &str,
        device: DeviceKeys,
        device_name: String,
        now: u64,
    ) -> AuthResult<AuthResponse> {
        self.take_shared(&self.sign_in_limiter, "sign-in", &peer.to_string(), now, "sign-in attempts")?;
        check_device(&peer, &device, &device_name)?;
        let invalid = || WireError::new(Code::AccessTokenInvalid, "invalid token specified");
        let token: BotToken = token.parse().map_err(|_| invalid())?;
        let presented = self.token_hash(&token.secret);
        let (account, session) = self.store.write(|t| {
            let stored = t.bot_secret(token.bot_id)?.ok_or_else(invalid)?;
            if presented != blake3::Hash::from_bytes(stored) {
                return Err(invalid());
            }
            let account = t.account(token.bot_id)?.filter(|a| a.kind == AccountKind::Bot).ok_or_else(invalid)?;
            let session = self.new_session(t, &account, peer, device.clone(), device_name.clone(), now)?;
            Ok((account, session))
        })?;
        tracing::info!(bot = %account.user_id, session = %session.session_id, "bot signed in");
        Ok(AuthResponse::SignedIn {
            account: account.to_account(),
            cert: self.issue_cert(&session, now),
            new_account: false,
        })
    }

    // ---- the signed-in device ----

    fn renew_cert(&self, peer: PeerId, now: u64) -> AuthResult<AuthResponse> {
        let session = self.session_seen(&peer, now)?;
        Ok(AuthResponse::Cert(self.issue_cert(&session, now)))
    }

    fn get_me(&self, peer: PeerId, now: u64) -> AuthResult<AuthResponse> {
        let session = self.session_seen(&peer, now)?;
        let account = self.store.read(|t| account_of(t, &session))?;
        Ok(AuthResponse::Me(account.to_account()))
    }

    fn set_profile(
        &self,
        peer: PeerId,
        username: Option<String>,
        name: Option<String>,
        now: u64,
    ) -> AuthResult<AuthResponse> {
        let account = self.store.write(|t| {
            let mut account = self.authed_account(t, &peer, now)?;
            if let Some(username) = &username {
                account.username = if username.trim().is_empty() {
                    None
                } else {
                    Some(self.free_username(t, username, account.kind, Some(account.user_id))?)
                };
            }
            if let Some(name) = &name {
                account.name = check_name(name)?;
            }
            t.put_account(&account)?;
            Ok::<_, WireError>(account)
        })?;
        Ok(AuthResponse::Me(account.to_account()))
    }

    /// Sets, changes or removes the 2FA password. argon2 runs outside the transaction.
    fn set_password(
        &self,
        peer: PeerId,
        current: Option<String>,
        new: Option<String>,
        now: u64,
    ) -> AuthResult<AuthResponse> {
        let account = self.store.read(|t| self.authed_account(t, &peer, now))?;
        if account.kind != AccountKind::User {
            return Err(WireError::new(Code::Forbidden, "bots sign in with tokens and have no password"));
        }
        if let Some(hash) = &account.password_hash {
            self.take_shared(&self.sign_in_limiter, "sign-in", &peer.to_string(), now, "password attempts")?;
            let current =
                current.ok_or_else(|| WireError::new(Code::PasswordHashInvalid, "the current password is required"))?;
            self.check_password(account.user_id, &current, hash, now)?;
        }
        let new_hash = new.map(|p| hash_password(&p)).transpose()?;
        let account = self.store.write(|t| {
            let mut account = self.authed_account(t, &peer, now)?;
            account.password_hash = new_hash.clone();
            t.put_account(&account)?;
            Ok::<_, WireError>(account)
        })?;
        Ok(AuthResponse::Me(account.to_account()))
    }

    /// Checks `user`'s 2FA password, counting wrong ones per account, durably: after
    /// `max_password_attempts` the account takes none for `password_lockout_secs`, whichever
    /// device asks. argon2 runs outside any transaction.
    fn check_password(&self, user: UserId, password: &str, hash: &str, now: u64) -> AuthResult<()> {
        let guard = self.store.read(|t| t.password_guard(user))?;
        if guard.locked_until > now {
            return Err(WireError::flood_wait(guard.locked_until - now, "wrong passwords on this account"));
        }
        match verify_password(password, hash) {
            Ok(()) => {
                if guard.wrong > 0 {
                    self.store.write(|t| t.put_password_guard(user, &PasswordGuard::default()))?;
                }
                Ok(())
            }
            Err(wrong) => {
                let limits = &self.limits;
                self.store.write(|t| {
                    let mut guard = t.password_guard(user)?;
                    guard.wrong += 1;
                    if guard.wrong >= limits.max_password_attempts {
                        tracing::warn!(%user, "too many wrong passwords; the account takes none for a while");
                        guard = PasswordGuard { wrong: 0, locked_until: now + limits.password_lockout_secs };
                    }
                    t.put_password_guard(user, &guard)
                })?;
                Err(wrong)
            }
        }
    }

    fn lookup(&self, peer: PeerId, query: &LookupQuery, now: u64) -> AuthResult<AuthResponse> {
        let (me, card) = self.store.read(|t| {
            let me = self.authed(t, &peer, now)?;
            Ok::<_, WireError>((me.user_id, card_of(t, query)))
        })?;
        // Limited after the read, which may run more than once; a lookup of nobody counts too.
        self.lookup_limiter.check(&me.to_string(), now).map_err(|secs| WireError::flood_wait(secs, "lookups"))?;
        Ok(AuthResponse::Card(card?))
    }

    fn list_sessions(&self, peer: PeerId, now: u64) -> AuthResult<AuthResponse> {
        let me = self.session_seen(&peer, now)?;
        let mut sessions = self.store.read(|t| {
            let all = t.active_sessions(me.user_id)?;
            Ok::<_, WireError>(all.iter().map(|s| s.to_info(me.session_id)).collect::<Vec<_>>())
        })?;
        sessions.sort_by_key(|s| (s.created_at, s.session_id));
        Ok(AuthResponse::Sessions(sessions))
    }

    fn put_backup(&self, peer: PeerId, mut backup: BackupRecord, keep: u8, now: u64) -> AuthResult<AuthResponse> {
        if backup.sealed.len() > MAX_BACKUP_POINTER_BYTES {
            return Err(WireError::new(
                Code::BadRequest,
                format!("a backup pointer may have at most {MAX_BACKUP_POINTER_BYTES} bytes"),
            ));
        }
        if !(1..=MAX_BACKUPS_KEPT).contains(&keep) {
            return Err(WireError::new(Code::BadRequest, format!("keep 1 to {MAX_BACKUPS_KEPT} backups")));
        }
        backup.created_at = now;
        self.store.write(|t| {
            let me = self.authed_user(t, &peer, now)?;
            t.put_backup(me.user_id, &backup, usize::from(keep))?;
            Ok::<_, WireError>(())
        })?;
        Ok(AuthResponse::Done)
    }

    fn revoke_session(&self, peer: PeerId, session_id: SessionId, now: u64) -> AuthResult<AuthResponse> {
        self.store.write(|t| {
            let me = self.authed(t, &peer, now)?;
            let mut target =
                t.session(session_id)?.filter(|s| s.user_id == me.user_id && s.revoked_at.is_none()).ok_or_else(
                    || WireError::new(Code::NotFound, format!("no active session {session_id} on this account")),
                )?;
            self.end_session(t, &mut target, now)?;
            Ok::<_, WireError>(())
        })?;
        tracing::info!(session = %session_id, "session revoked");
        Ok(AuthResponse::Revoked { count: 1 })
    }

    fn revoke_other_sessions(&self, peer: PeerId, now: u64) -> AuthResult<AuthResponse> {
        let count = self.store.write(|t| {
            let me = self.authed(t, &peer, now)?;
            let mut count = 0;
            for mut other in t.active_sessions(me.user_id)? {
                if other.session_id != me.session_id {
                    self.end_session(t, &mut other, now)?;
                    count += 1;
                }
            }
            Ok::<_, WireError>(count)
        })?;
        Ok(AuthResponse::Revoked { count })
    }

    // ---- bots (BotFather, and the operator's admin endpoint) ----

    /// Creates a bot owned by `owner` (`None`: the operator) and issues its first token.
    pub fn create_bot(
        &self,
        owner: Option<UserId>,
        username: &str,
        name: &str,
        now: u64,
    ) -> AuthResult<IssuedBotToken> {
        let (secret, hash) = self.new_token_secret();
        let bot = self.store.write(|t| {
            if let Some(owner) = owner {
                match t.account(owner)? {
                    Some(a) if a.kind == AccountKind::User => {}
                    Some(_) => return Err(WireError::new(Code::Forbidden, "bots cannot create bots")),
                    None => return Err(WireError::new(Code::NotFound, format!("no user {owner}"))),
                }
                if t.bots_of(owner)?.len() >= MAX_BOTS_PER_OWNER {
                    return Err(WireError::new(
                        Code::Forbidden,
                        format!("a user may own at most {MAX_BOTS_PER_OWNER} bots"),
                    ));
                }
            }
            let username = self.free_username(t, username, AccountKind::Bot, None)?;
            let name = check_name(name)?;
            if name.is_empty() {
                return Err(WireError::new(Code::NameInvalid, "a bot needs a name"));
            }
            let bot = StoredAccount {
                user_id: t.next_user_id()?,
                kind: AccountKind::Bot,
                phone: None,
                username: Some(username),
                name,
                password_hash: None,
                owner,
                created_at: now,
            };
            t.put_account(&bot)?;
            t.put_bot_secret(bot.user_id, owner, hash.as_bytes())?;
            Ok(bot)
        })?;
        tracing::info!(bot = %bot.user_id, owner = ?owner, "bot created");
        Ok(IssuedBotToken { token: format!("{}:{secret}", bot.user_id), bot: bot.to_account() })
    }

    /// Bots of `owner`, or every bot for the operator (`None`).
    pub fn list_bots(&self, owner: Option<UserId>) -> AuthResult<Vec<Account>> {
        let bots = self.store.read(|t| match owner {
            Some(owner) => t.bots_of(owner),
            None => t.all_bots(),
        })?;
        Ok(bots.iter().map(StoredAccount::to_account).collect())
    }

    /// Issues a new token for `bot`; the old one stops working and the bot's sessions end.
    pub fn revoke_bot_token(&self, owner: Option<UserId>, bot: UserId, now: u64) -> AuthResult<IssuedBotToken> {
        let (secret, hash) = self.new_token_secret();
        let account = self.store.write(|t| {
            let account = t
                .account(bot)?
                .filter(|a| a.kind == AccountKind::Bot)
                .ok_or_else(|| WireError::new(Code::NotFound, format!("there is no bot {bot}")))?;
            if owner.is_some() && account.owner != owner {
                return Err(WireError::new(Code::Forbidden, format!("bot {bot} belongs to someone else")));
            }
            t.put_bot_secret(bot, account.owner, hash.as_bytes())?;
            for mut session in t.active_sessions(bot)? {
                self.end_session(t, &mut session, now)?;
            }
            Ok::<_, WireError>(account)
        })?;
        tracing::info!(bot = %bot, "bot token revoked");
        Ok(IssuedBotToken { token: format!("{bot}:{secret}"), bot: account.to_account() })
    }

    // ---- revocations (relays fetch them; see docs/DECISIONS.md) ----

    /// `Revocations`: the list from `since` on, for relays of this network only. It names
    /// devices that signed out, which is nobody else's business.
    fn revocations(&self, peer: PeerId, since: u64, relay_cert: &RelayCert, now: u64) -> AuthResult<AuthResponse> {
        self.check_relay_cert(peer, relay_cert, "revocations", now)?;
        self.store.read(|t| {
            refuse_revoked_relay(t, peer)?;
            let end = t.next_revocation_seq()?;
            // A relay that is ahead of this database (it was replaced) starts over.
            let since = if since > end { 0 } else { since };
            let found = t.revocations_since(since, MAX_REVOCATIONS_PER_ANSWER)?;
            let more = found.len() == MAX_REVOCATIONS_PER_ANSWER;
            let next = found.last().map_or(since, |(seq, _)| seq.saturating_add(1));
            let revocations = found.into_iter().map(|(_, r)| r).filter(|r| r.body.until >= now).collect();
            Ok(AuthResponse::Revocations { revocations, next, more })
        })
    }

    /// `DevicesExist`: which of `devices` have a live session, for relays of this network only
    /// (who is signed in on which device is nobody else's business).
    fn devices_exist(
        &self,
        peer: PeerId,
        devices: &[PeerId],
        relay_cert: &RelayCert,
        now: u64,
    ) -> AuthResult<AuthResponse> {
        if devices.len() > MAX_DEVICES_PER_QUESTION {
            let why = format!("at most {MAX_DEVICES_PER_QUESTION} devices per question");
            return Err(WireError::new(Code::BadRequest, why));
        }
        self.check_relay_cert(peer, relay_cert, "device questions", now)?;
        self.store.read(|t| {
            refuse_revoked_relay(t, peer)?;
            let mut existing = Vec::new();
            for device in devices {
                if t.session_of_device(device)?.is_some_and(|s| s.revoked_at.is_none()) {
                    existing.push(*device);
                }
            }
            Ok(AuthResponse::Devices { existing })
        })
    }

    /// Refuses a caller that is not a relay of this network, before anything is read:
    /// `relay_cert` must be its own and signed here (and its admission not revoked,
    /// [`refuse_revoked_relay`]). `what` says what only relays may ask.
    fn check_relay_cert(&self, peer: PeerId, relay_cert: &RelayCert, what: &str, now: u64) -> Result<(), WireError> {
        relay_cert
            .verify_for(&self.signer.public(), &peer, now)
            .map(|_| ())
            .map_err(|e| WireError::new(Code::CertInvalid, format!("{what} are for relays of this network: relay {e}")))
    }

    /// Ends `relay`'s admission: relays stop giving it copies and refuse its replica requests
    /// within seconds. For good: an admitted-again relay comes back under a new key.
    pub fn revoke_relay(&self, relay: PeerId, now: u64) -> AuthResult<RevokedRelay> {
        let revoked_at = self.store.write(|t| {
            if let Some(at) = t.relay_revoked_at(&relay)? {
                return Ok::<_, WireError>(at);
            }
            t.put_revoked_relay(&relay, now)?;
            self.record_revocation(t, relay, Revoked::Relay, now, u64::MAX)?;
            Ok(now)
        })?;
        tracing::info!(%relay, "relay admission revoked");
        Ok(RevokedRelay { relay, revoked_at })
    }

    /// Marks `session` revoked and tells the relays: its certificates (at most one TTL old)
    /// stop working there within seconds instead of at expiry.
    fn end_session(&self, t: &mut dyn Tables, session: &mut StoredSession, now: u64) -> Result<(), StoreError> {
        session.revoked_at = Some(now);
        t.put_session(session)?;
        // A certificate issued just before is valid until `now + TTL`, and a relay whose clock
        // is behind ours takes it for up to one skew longer than that (plus its own skew).
        let until = now.saturating_add(self.limits.cert_ttl_secs).saturating_add(2 * CERT_CLOCK_SKEW_SECS);
        self.record_revocation(t, session.device, Revoked::Session(session.session_id), now, until)
    }

    /// Signs and stores a revocation, dropping those that no longer matter.
    fn record_revocation(
        &self,
        t: &mut dyn Tables,
        peer: PeerId,
        revoked: Revoked,
        now: u64,
        until: u64,
    ) -> Result<(), StoreError> {
        let revocation = Revocation::sign(RevocationBody { peer, revoked, revoked_at: now, until }, &self.signer);
        t.add_revocation(&revocation)?;
        t.prune_revocations(now)?;
        Ok(())
    }

    /// Creates a session for `peer`, ending the device's previous one: a device has one session.
    fn new_session(
        &self,
        t: &mut dyn Tables,
        account: &StoredAccount,
        peer: PeerId,
        keys: DeviceKeys,
        device_name: String,
        now: u64,
    ) -> AuthResult<StoredSession> {
        if let Some(mut old) = t.session_of_device(&peer)?
            && old.revoked_at.is_none()
        {
            self.end_session(t, &mut old, now)?;
        }
        let session = StoredSession {
            session_id: SessionId::random(),
            user_id: account.user_id,
            device: peer,
            keys,
            device_name,
            kind: account.kind,
            created_at: now,
            last_seen: now,
            revoked_at: None,
        };
        t.put_session(&session)?;
        Ok(session)
    }

    // ---- helpers ----

    /// Takes a token from a limit that must hold across gateways: kept in the database when
    /// gateways share one ([`Store::take_token`]). `what` says what is limited.
    fn take_shared(
        &self,
        limiter: &RateLimiter,
        name: &'static str,
        key: &str,
        now: u64,
        what: &str,
    ) -> AuthResult<()> {
        self.store.take_token(limiter, name, key, now)?.map_err(|secs| WireError::flood_wait(secs, what))
    }

    /// The caller's active session, refreshing `last_seen` now and then.
    fn authed(&self, t: &mut dyn Tables, peer: &PeerId, now: u64) -> AuthResult<StoredSession> {
        let mut session = live_session(t, peer)?;
        if now >= session.last_seen + LAST_SEEN_RESOLUTION_SECS {
            session.last_seen = now;
            t.put_session(&session)?;
        }
        Ok(session)
    }

    /// The device's session, for a request that writes nothing else: read without a commit,
    /// and its `last_seen` written (a durable commit) only when due, once a minute.
    fn session_seen(&self, peer: &PeerId, now: u64) -> AuthResult<StoredSession> {
        let session = self.store.read(|t| live_session(t, peer))?;
        if now < session.last_seen + LAST_SEEN_RESOLUTION_SECS {
            return Ok(session);
        }
        // Checked again in the writing transaction: it may have been revoked meanwhile.
        self.store.write(|t| self.authed(t, peer, now))
    }

    fn authed_account(&self, t: &mut dyn Tables, peer: &PeerId, now: u64) -> AuthResult<StoredAccount> {
        let session = self.authed(t, peer, now)?;
        account_of(t, &session)
    }

    fn authed_user(&self, t: &mut dyn Tables, peer: &PeerId, now: u64) -> AuthResult<StoredAccount> {
        let account = self.authed_account(t, peer, now)?;
        if account.kind != AccountKind::User {
            return Err(WireError::new(Code::Forbidden, "bots cannot manage bots"));
        }
        Ok(account)
    }

    /// Validates a username for an account kind and checks nobody else holds it.
    fn free_username(
        &self,
        t: &mut dyn Tables,
        raw: &str,
        kind: AccountKind,
        me: Option<UserId>,
    ) -> AuthResult<Username> {
        let username = valid_username(raw, kind)?;
        let taken = match t.username_holder(&username)? {
            Some(holder) => Some(holder) != me,
            // A public channel's name is not free for accounts either.
            None => t.channel_name(&username)?.is_some(),
        };
        match taken {
            true => Err(WireError::new(Code::UsernameOccupied, format!("{username} is already taken"))),
            false => Ok(username),
        }
    }

    fn issue_cert(&self, session: &StoredSession, now: u64) -> meshgram_node::crypto::cert::SessionCert {
        SessionCert::sign(
            CertBody {
                user_id: session.user_id,
                device: session.device,
                noise_key: session.keys.noise_key,
                session_id: session.session_id,
                kind: session.kind,
                not_before: now,
                not_after: now + self.limits.cert_ttl_secs,
            },
            &self.signer,
        )
    }

    fn random_code(&self) -> String {
        let mut rng = rand::rngs::OsRng;
        (0..self.limits.code_length).map(|_| char::from(b'0' + rng.gen_range(0..10u8))).collect()
    }

    fn code_hash(&self, code: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.code_key, code.as_bytes())
    }

    fn token_hash(&self, secret: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.token_key, secret.as_bytes())
    }

    fn new_token_secret(&self) -> (String, blake3::Hash) {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
        let mut rng = rand::rngs::OsRng;
        let secret: String =
            (0..BOT_TOKEN_SECRET_LEN).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect();
        let hash = self.token_hash(&secret);
        (secret, hash)
    }
}

/// The device keys must verify and belong to the connection's peer.
/// The device's session, if it is signed in and the session was not ended.
fn live_session(t: &mut dyn Tables, peer: &PeerId) -> AuthResult<StoredSession> {
    let session = t
        .session_of_device(peer)?
        .ok_or_else(|| WireError::new(Code::AuthKeyUnregistered, "this device is not signed in; run login"))?;
    if session.revoked_at.is_some() {
        return Err(WireError::new(Code::SessionRevoked, "this session was ended; sign in again"));
    }
    Ok(session)
}

/// The card of the account `query` names.
fn card_of(t: &mut dyn Tables, query: &LookupQuery) -> AuthResult<UserCard> {
    let account = match query {
        LookupQuery::Username(name) => t.account_by_username(name)?,
        LookupQuery::Phone(phone) => t.account_by_phone(phone)?,
        LookupQuery::UserId(id) => t.account(*id)?,
        LookupQuery::Group(_) => None,
    }
    .ok_or_else(|| WireError::new(Code::NotFound, "no such user"))?;
    let devices = t
        .active_sessions(account.user_id)?
        .into_iter()
        .map(|s| DeviceCard { peer_id: s.device, keys: s.keys })
        .collect();
    Ok(UserCard {
        user_id: account.user_id,
        kind: account.kind,
        username: account.username,
        name: account.name,
        devices,
    })
}

/// The account of a live session.
fn account_of(t: &mut dyn Tables, session: &StoredSession) -> AuthResult<StoredAccount> {
    t.account(session.user_id)?
        .ok_or_else(|| WireError::new(Code::AuthKeyUnregistered, "the account of this session no longer exists"))
}

fn check_device(peer: &PeerId, keys: &DeviceKeys, device_name: &str) -> AuthResult<()> {
    let device = keys.verify().map_err(|e| WireError::new(Code::DeviceKeysInvalid, e.to_string()))?;
    if &device != peer {
        return Err(WireError::new(
            Code::DeviceKeysInvalid,
            "the device keys belong to another device than this connection's",
        ));
    }
    if device_name.chars().count() > MAX_DEVICE_NAME_CHARS || device_name.chars().any(char::is_control) {
        return Err(WireError::new(
            Code::BadRequest,
            format!("device name must be at most {MAX_DEVICE_NAME_CHARS} printable characters"),
        ));
    }
    Ok(())
}

/// A display name: trimmed, 1–64 printable characters.
fn check_name(name: &str) -> AuthResult<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(WireError::new(
            Code::NameInvalid,
            format!("a name must be 1-{MAX_NAME_CHARS} printable characters"),
        ));
    }
    Ok(name.to_string())
}

fn hash_password(password: &str) -> AuthResult<String> {
    if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
        return Err(WireError::new(Code::BadRequest, format!("a password must be 1-{MAX_PASSWORD_BYTES} bytes")));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| WireError::new(Code::Internal, format!("could not hash the password: {e}")))
}

fn verify_password(password: &str, hash: &str) -> AuthResult<()> {
    let invalid = || WireError::new(Code::PasswordHashInvalid, "the password is wrong");
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(invalid());
    }
    let parsed = PasswordHash::new(hash).map_err(|e| {
        tracing::error!(error = %e, "stored password hash does not parse");
        WireError::new(Code::Internal, "internal error")
    })?;
    Argon2::default().verify_password(password.as_bytes(), &parsed).map_err(|_| invalid())
}

/// A username as written, checked for the account kind (bots' end in "bot", no one else's do).
fn valid_username(raw: &str, kind: AccountKind) -> AuthResult<Username> {
    let username: Username =
        raw.parse().map_err(|e: meshgram_node::ids::InvalidValue| WireError::new(Code::UsernameInvalid, e.0))?;
    match (kind, username.is_bot_name()) {
        (AccountKind::User, true) => {
            return Err(WireError::new(Code::UsernameInvalid, "usernames ending in 'bot' are reserved for bots"));
        }
        (AccountKind::Bot, false) => {
            return Err(WireError::new(Code::UsernameInvalid, "a bot's username must end in 'bot'"));
        }
        _ => {}
    }
    Ok(username)
}

/// Refuses a relay whose admission was revoked.
fn refuse_revoked_relay(t: &mut dyn Tables, relay: PeerId) -> Result<(), WireError> {
    if t.relay_revoked_at(&relay)?.is_some() {
        return Err(WireError::new(Code::CertInvalid, "this relay's admission was revoked"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use meshgram_node::crypto::identity::DeviceIdentity;

    use super::*;
    use meshgram_node::proto::KdfParams;

    const T0: u64 = 1_800_000_000;

    struct Fixture {
        service: AuthService,
        sink: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn fixture(limits: Limits) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sink = dir.path().join("codes.log");
        let service = AuthService::new(
            Store::open(&dir.path().join("gw.redb")).unwrap(),
            ed25519::Keypair::generate(),
            CodeSender::File(sink.clone()),
            limits,
            tokio::runtime::Handle::current(),
            Arc::new(Metrics::new()),
        );
        Fixture { service, sink, _dir: dir }
    }

    struct Device {
        identity: DeviceIdentity,
        _dir: tempfile::TempDir,
    }

    fn device() -> Device {
        let dir = tempfile::tempdir().unwrap();
        Device { identity: DeviceIdentity::load_or_create(dir.path()).unwrap(), _dir: dir }
    }

    fn phone(s: &str) -> Phone {
        s.parse().unwrap()
    }

    impl Fixture {
        fn call(&self, device: &Device, request: AuthRequest, now: u64) -> AuthResponse {
            self.service.handle(device.identity.peer_id(), Ok(request), now)
        }

        fn last_code(&self) -> String {
            let text = std::fs::read_to_string(&self.sink).unwrap();
            let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            line["code"].as_str().unwrap().to_string()
        }

        fn sign_in(
            &self,
            device: &Device,
            phone: &Phone,
            code: &str,
            password: Option<&str>,
            now: u64,
        ) -> AuthResponse {
            let request = AuthRequest::SignIn {
                phone: phone.clone(),
                code: code.into(),
                device: device.identity.device_keys(),
                device_name: "test".into(),
                password: password.map(str::to_string),
            };
            self.call(device, request, now)
        }

        fn login(&self, device: &Device, phone: &Phone, now: u64) -> Account {
            assert!(matches!(
                self.call(device, AuthRequest::SendCode { phone: phone.clone() }, now),
                AuthResponse::CodeSent { .. }
            ));
            match self.sign_in(device, phone, &self.last_code(), None, now) {
                AuthResponse::SignedIn { account, .. } => account,
                other => panic!("sign-in failed: {other:?}"),
            }
        }
    }

    fn error_code(response: AuthResponse) -> Code {
        match response {
            AuthResponse::Error(e) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn certificate_is_signed_for_the_device_and_verifies() {
        let f = fixture(Limits::default());
        let d = device();
        f.call(&d, AuthRequest::SendCode { phone: phone("+15550000001") }, T0);
        let AuthResponse::SignedIn { cert, new_account, .. } =
            f.sign_in(&d, &phone("+15550000001"), &f.last_code(), None, T0)
        else {
            panic!("sign-in failed");
        };
        assert!(new_account);
        let body = cert.verify_for(&f.service.public_key(), &d.identity.peer_id(), T0 + 10).unwrap();
        assert_eq!(body.noise_key, d.identity.noise_public);
        assert_eq!(body.not_after, T0 + Limits::default().cert_ttl_secs);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn codes_expire_are_single_use_and_lock_out_after_too_many_wrong_tries() {
        let limits = Limits { max_code_attempts: 3, code_ttl_secs: 60, code_lockout_secs: 600, ..Limits::default() };
        let f = fixture(limits);
        let d = device();
        let p = phone("+15550000002");

        // Expired exactly at the TTL boundary.
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0);
        assert_eq!(error_code(f.sign_in(&d, &p, &f.last_code(), None, T0 + 60)), Code::PhoneCodeExpired);

        // Single use.
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 100);
        let code = f.last_code();
        assert!(matches!(f.sign_in(&d, &p, &code, None, T0 + 101), AuthResponse::SignedIn { .. }));
        assert_eq!(error_code(f.sign_in(&d, &p, &code, None, T0 + 102)), Code::PhoneCodeExpired);

        // Wrong codes: two refusals, then a lockout that also blocks the right code and new codes.
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 200);
        let code = f.last_code();
        let wrong = if code == "00000" { "11111" } else { "00000" };
        assert_eq!(error_code(f.sign_in(&d, &p, wrong, None, T0 + 201)), Code::PhoneCodeInvalid);
        assert_eq!(error_code(f.sign_in(&d, &p, wrong, None, T0 + 202)), Code::PhoneCodeInvalid);
        let AuthResponse::Error(locked) = f.sign_in(&d, &p, wrong, None, T0 + 203) else { panic!() };
        assert_eq!((locked.code, locked.retry_after_secs), (Code::FloodWait, Some(600)));
        let AuthResponse::Error(still) = f.sign_in(&d, &p, &code, None, T0 + 303) else { panic!() };
        assert_eq!((still.code, still.retry_after_secs), (Code::FloodWait, Some(500)));
        assert_eq!(error_code(f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 303)), Code::FloodWait);
        // After the lockout a fresh code works, and the count starts again.
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 850);
        assert_eq!(error_code(f.sign_in(&d, &p, wrong, None, T0 + 851)), Code::PhoneCodeInvalid);
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 900);
        assert!(matches!(f.sign_in(&d, &p, &f.last_code(), None, T0 + 901), AuthResponse::SignedIn { .. }));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn wrong_codes_lock_out_the_guessing_device_and_address_not_the_number() {
        let limits = Limits {
            max_code_attempts: 2,
            max_code_attempts_per_phone: 6,
            wrong_code_ip_burst: 3,
            send_code_burst: 20,
            ..Limits::default()
        };
        let f = fixture(limits);
        let p = phone("+15550000010");
        let wrong = |f: &Fixture| if f.last_code() == "00000" { "11111" } else { "00000" }.to_string();
        let guess = |f: &Fixture, d: &Device, ip: &str, code: &str, now: u64| {
            let request = AuthRequest::SignIn {
                phone: p.clone(),
                code: code.into(),
                device: d.identity.device_keys(),
                device_name: "test".into(),
                password: None,
            };
            f.service.handle_from(d.identity.peer_id(), Some(ip.parse().unwrap()), Ok(request), now)
        };
        let send = |f: &Fixture, d: &Device, now: u64| f.call(d, AuthRequest::SendCode { phone: p.clone() }, now);

        // The attacker's device guesses at its own code until it is locked out of the number.
        let mallory = device();
        send(&f, &mallory, T0);
        assert_eq!(error_code(guess(&f, &mallory, "203.0.113.9", &wrong(&f), T0)), Code::PhoneCodeInvalid);
        let AuthResponse::Error(locked) = guess(&f, &mallory, "203.0.113.9", &wrong(&f), T0) else { panic!() };
        assert_eq!((locked.code, locked.retry_after_secs), (Code::FloodWait, Some(900)));
        assert!(locked.message.contains("from this device"), "{}", locked.message);
        assert_eq!(error_code(send(&f, &mallory, T0 + 1)), Code::FloodWait, "no new code for it either");

        // The owner, on another device and address, still gets a code and signs in with it,
        // and a guess from a device that asked for no code finds none.
        let owner = device();
        send(&f, &owner, T0 + 2);
        let code = f.last_code();
        assert_eq!(error_code(guess(&f, &device(), "198.51.100.7", &code, T0 + 2)), Code::PhoneCodeExpired);
        assert!(matches!(guess(&f, &owner, "198.51.100.7", &code, T0 + 3), AuthResponse::SignedIn { .. }));

        // Fresh devices from the same address: its third wrong code is its last for a while.
        let second = device();
        send(&f, &second, T0 + 4);
        assert_eq!(error_code(guess(&f, &second, "203.0.113.9", &wrong(&f), T0 + 4)), Code::PhoneCodeInvalid);
        let third = device();
        send(&f, &third, T0 + 5);
        let right = f.last_code();
        let AuthResponse::Error(address) = guess(&f, &third, "203.0.113.9", &right, T0 + 5) else { panic!() };
        assert_eq!(address.code, Code::FloodWait);
        assert!(address.message.contains("from this address"), "{}", address.message);

        // Many addresses together: the number takes no code for a while after 6 wrong ones
        // (one counted since the owner's sign-in cleared the count), even the right one.
        for i in 0..6u64 {
            let d = device();
            send(&f, &d, T0 + 10 + i);
            let _ = guess(&f, &d, &format!("192.0.2.{i}"), &wrong(&f), T0 + 10 + i);
        }
        let owner_again = device();
        let AuthResponse::Error(number) = send(&f, &owner_again, T0 + 20) else { panic!("the number is locked") };
        assert_eq!(number.code, Code::FloodWait);
        assert!(number.message.contains("for this number") && !number.message.contains("device"), "{}", number.message);
        send(&f, &owner_again, T0 + 20 + 900);
        assert!(matches!(
            guess(&f, &owner_again, "198.51.100.7", &f.last_code(), T0 + 20 + 900),
            AuthResponse::SignedIn { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reads_and_refusals_commit_nothing() {
        let f = fixture(Limits { send_code_burst: 1, ..Limits::default() });
        let d = device();
        f.login(&d, &phone("+15550000011"), T0);
        let commits = || f.service.store.commits();
        let before = commits();
        for _ in 0..10 {
            assert!(matches!(f.call(&d, AuthRequest::GetMe, T0 + 1), AuthResponse::Me(_)));
            assert!(matches!(f.call(&d, AuthRequest::RenewCert, T0 + 1), AuthResponse::Cert(_)));
            assert!(matches!(f.call(&d, AuthRequest::ListSessions, T0 + 1), AuthResponse::Sessions(_)));
            let refused = f.call(&d, AuthRequest::SendCode { phone: phone("+15550000011") }, T0 + 1);
            assert_eq!(error_code(refused), Code::FloodWait);
            assert_eq!(error_code(f.call(&device(), AuthRequest::GetMe, T0 + 1)), Code::AuthKeyUnregistered);
        }
        assert_eq!(commits(), before, "nothing was written");
        // A minute on, the session's last_seen is due: one commit, then none again.
        f.call(&d, AuthRequest::GetMe, T0 + 61);
        f.call(&d, AuthRequest::GetMe, T0 + 62);
        assert_eq!(commits(), before + 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_code_does_not_reset_the_wrong_attempt_count() {
        let f = fixture(Limits { max_code_attempts: 2, ..Limits::default() });
        let d = device();
        let p = phone("+15550000009");
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0);
        let wrong = if f.last_code() == "00000" { "11111" } else { "00000" };
        assert_eq!(error_code(f.sign_in(&d, &p, wrong, None, T0 + 1)), Code::PhoneCodeInvalid);
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0 + 2);
        let wrong = if f.last_code() == "00000" { "11111" } else { "00000" };
        assert_eq!(error_code(f.sign_in(&d, &p, wrong, None, T0 + 3)), Code::FloodWait);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn code_requests_are_rate_limited_per_phone_with_retry_after() {
        let f = fixture(Limits { send_code_burst: 2, send_code_refill_secs: 100, ..Limits::default() });
        let d = device();
        let p = phone("+15550000003");
        for _ in 0..2 {
            assert!(matches!(
                f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0),
                AuthResponse::CodeSent { .. }
            ));
        }
        let AuthResponse::Error(e) = f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0) else { panic!() };
        assert_eq!((e.code, e.retry_after_secs), (Code::FloodWait, Some(100)));
        assert!(matches!(
            f.call(&d, AuthRequest::SendCode { phone: phone("+15550000004") }, T0),
            AuthResponse::CodeSent { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn device_keys_must_belong_to_the_connection() {
        let f = fixture(Limits::default());
        let (d, thief) = (device(), device());
        let p = phone("+15550000005");
        f.call(&d, AuthRequest::SendCode { phone: p.clone() }, T0);
        let request = AuthRequest::SignIn {
            phone: p.clone(),
            code: f.last_code(),
            device: d.identity.device_keys(),
            device_name: "x".into(),
            password: None,
        };
        assert_eq!(error_code(f.call(&thief, request, T0)), Code::DeviceKeysInvalid);
        let mut forged = d.identity.device_keys();
        forged.noise_key = thief.identity.noise_public;
        let request = AuthRequest::SignIn {
            phone: p,
            code: f.last_code(),
            device: forged,
            device_name: "x".into(),
            password: None,
        };
        assert_eq!(error_code(f.call(&d, request, T0)), Code::DeviceKeysInvalid);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn malformed_frames_and_unsigned_devices_get_clear_errors() {
        let f = fixture(Limits::default());
        let d = device();
        let frame = FrameError::TooLarge { len: 1 << 20, max: 16 << 10 };
        let AuthResponse::Error(e) = f.service.handle(d.identity.peer_id(), Err(frame), T0) else { panic!() };
        assert_eq!(e.code, Code::BadRequest);
        assert!(e.message.contains("exceeds"), "{}", e.message);
        assert_eq!(error_code(f.call(&d, AuthRequest::GetMe, T0)), Code::AuthKeyUnregistered);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn backup_pointers_are_the_accounts_own_bounded_and_only_the_newest_kept() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(), device());
        f.login(&alice, &phone("+15550000021"), T0);
        f.login(&bob, &phone("+15550000022"), T0);
        let kdf = KdfParams { salt: [1; 16], m_kib: 8, t: 1, p: 1 };
        let put = |d, n: u8, keep| {
            let backup = BackupRecord { created_at: 0, kdf, sealed: vec![n; 64] };
            f.call(d, AuthRequest::PutBackup { backup, keep }, T0 + u64::from(n))
        };
        for n in 1..=4 {
            assert!(matches!(put(&alice, n, 3), AuthResponse::Done));
        }
        let AuthResponse::Backups(list) = f.call(&alice, AuthRequest::ListBackups, T0 + 10) else { panic!() };
        let kept: Vec<u8> = list.iter().map(|b| b.sealed[0]).collect();
        assert_eq!(kept, [4, 3, 2], "newest first, the oldest dropped");
        assert_eq!(list[0].created_at, T0 + 4, "the gateway stamps the time");
        let AuthResponse::Backups(none) = f.call(&bob, AuthRequest::ListBackups, T0) else { panic!() };
        assert!(none.is_empty(), "another account sees none of them");
        let huge = BackupRecord { created_at: 0, kdf, sealed: vec![0; MAX_BACKUP_POINTER_BYTES + 1] };
        assert_eq!(error_code(f.call(&alice, AuthRequest::PutBackup { backup: huge, keep: 3 }, T0)), Code::BadRequest);
        assert_eq!(error_code(put(&alice, 5, 0)), Code::BadRequest);
        assert_eq!(error_code(f.call(&device(), AuthRequest::ListBackups, T0)), Code::AuthKeyUnregistered);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn password_is_required_checked_and_keeps_the_code_usable() {
        let f = fixture(Limits::default());
        let (d1, d2) = (device(), device());
        let p = phone("+15550000006");
        f.login(&d1, &p, T0);
        assert!(matches!(
            f.call(&d1, AuthRequest::SetPassword { current: None, new: Some("hunter2".into()) }, T0),
            AuthResponse::Me(Account { has_password: true, .. })
        ));
        f.call(&d2, AuthRequest::SendCode { phone: p.clone() }, T0);
        let code = f.last_code();
        assert_eq!(error_code(f.sign_in(&d2, &p, &code, None, T0)), Code::SessionPasswordNeeded);
        assert_eq!(error_code(f.sign_in(&d2, &p, &code, Some("wrong"), T0)), Code::PasswordHashInvalid);
        assert!(matches!(f.sign_in(&d2, &p, &code, Some("hunter2"), T0), AuthResponse::SignedIn { .. }));
        // Changing it needs the current one.
        assert_eq!(
            error_code(f.call(&d1, AuthRequest::SetPassword { current: Some("nope".into()), new: None }, T0)),
            Code::PasswordHashInvalid
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn signing_in_again_on_a_device_replaces_its_session() {
        let f = fixture(Limits::default());
        let d = device();
        let p = phone("+15550000007");
        f.login(&d, &p, T0);
        f.login(&d, &p, T0 + 1);
        let AuthResponse::Sessions(list) = f.call(&d, AuthRequest::ListSessions, T0 + 2) else { panic!() };
        assert_eq!(list.len(), 1);
        assert!(list[0].current);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bot_lists_commands_that_users_read_and_only_a_bot_sets_them() {
        let f = fixture(Limits::default());
        let (owner, bot_device) = (device(), device());
        let me = f.login(&owner, &phone("+15550000009"), T0);
        let issued = f.service.create_bot(Some(me.user_id), "cmd_bot", "Cmd", T0).unwrap();
        let sign_in = AuthRequest::BotSignIn {
            token: issued.token.clone(),
            device: bot_device.identity.device_keys(),
            device_name: "bridge".into(),
        };
        assert!(matches!(f.call(&bot_device, sign_in, T0), AuthResponse::SignedIn { .. }));
        let start = BotCommandInfo { command: "start".into(), description: "Say hello".into() };
        let set = |commands: Vec<BotCommandInfo>| AuthRequest::SetBotCommands { commands };
        assert!(matches!(f.call(&bot_device, set(vec![start.clone()]), T0), AuthResponse::Done));
        let read = AuthRequest::BotCommands { bot: issued.bot.user_id };
        assert!(matches!(f.call(&owner, read.clone(), T0), AuthResponse::BotCommands(c) if c == vec![start.clone()]));
        assert_eq!(error_code(f.call(&owner, set(vec![start.clone()]), T0)), Code::Forbidden, "a person lists none");
        let bad = BotCommandInfo { command: "Start!".into(), description: "x".into() };
        assert_eq!(error_code(f.call(&bot_device, set(vec![bad]), T0)), Code::BadRequest);
        assert_eq!(error_code(f.call(&owner, AuthRequest::BotCommands { bot: me.user_id }, T0)), Code::NotFound);
        assert!(matches!(f.call(&bot_device, set(vec![]), T0), AuthResponse::Done));
        assert!(matches!(f.call(&owner, read, T0), AuthResponse::BotCommands(c) if c.is_empty()));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_public_channel_name_is_first_come_shared_with_usernames_and_read_by_anyone() {
        let f = fixture(Limits::default());
        let (alice, bob) = (device(), device());
        f.login(&alice, &phone("+15550000021"), T0);
        f.login(&bob, &phone("+15550000022"), T0);
        let name = |name: &str, link: &str| AuthRequest::SetChannelName { name: name.into(), link: link.into() };
        assert!(matches!(f.call(&alice, name("@News_X", "meshgram:channel/one"), T0), AuthResponse::Done));
        let read = AuthRequest::ChannelByName { name: "news_x".into() };
        assert!(matches!(f.call(&bob, read.clone(), T0), AuthResponse::ChannelLink(l) if l == "meshgram:channel/one"));
        // Taken: by another user's channel, and for usernames too; its owner may point it anew.
        assert_eq!(error_code(f.call(&bob, name("news_x", "meshgram:channel/two"), T0)), Code::UsernameOccupied);
        let profile = AuthRequest::SetProfile { username: Some("news_x".into()), name: None };
        assert_eq!(error_code(f.call(&bob, profile, T0)), Code::UsernameOccupied);
        assert!(matches!(f.call(&alice, name("news_x", "meshgram:channel/three"), T0), AuthResponse::Done));
        assert!(matches!(f.call(&bob, read, T0), AuthResponse::ChannelLink(l) if l == "meshgram:channel/three"));
        // A user's username is not a channel's; bad names and links are refused.
        let taken = AuthRequest::SetProfile { username: Some("bob_x".into()), name: None };
        assert!(matches!(f.call(&bob, taken, T0), AuthResponse::Me(_)));
        assert_eq!(error_code(f.call(&alice, name("bob_x", "meshgram:channel/four"), T0)), Code::UsernameOccupied);
        assert_eq!(error_code(f.call(&alice, name("no", "meshgram:channel/five"), T0)), Code::UsernameInvalid);
        assert_eq!(error_code(f.call(&alice, name("news_bot", "l"), T0)), Code::UsernameInvalid);
        assert_eq!(error_code(f.call(&alice, name("long_link", &"x".repeat(1025)), T0)), Code::BadRequest);
        let unknown = AuthRequest::ChannelByName { name: "nobody_here".into() };
        assert_eq!(error_code(f.call(&bob, unknown, T0)), Code::NotFound);
        // Released by its owner only (an empty link); then free for anyone, as a username too.
        assert_eq!(error_code(f.call(&bob, name("news_x", ""), T0)), Code::Forbidden);
        assert!(matches!(f.call(&alice, name("news_x", ""), T0), AuthResponse::Done));
        let read = AuthRequest::ChannelByName { name: "news_x".into() };
        assert_eq!(error_code(f.call(&bob, read, T0)), Code::NotFound);
        assert_eq!(error_code(f.call(&alice, name("news_x", ""), T0)), Code::NotFound, "released already");
        let profile = AuthRequest::SetProfile { username: Some("news_x".into()), name: None };
        assert!(matches!(f.call(&bob, profile, T0), AuthResponse::Me(_)));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bot_tokens_sign_in_and_revocation_ends_them() {
        let f = fixture(Limits::default());
        let (owner, bot_device) = (device(), device());
        let me = f.login(&owner, &phone("+15550000008"), T0);
        let issued = f.service.create_bot(Some(me.user_id), "Echo_Bot", "Echo", T0).unwrap();
        assert_eq!(
            error_code(f.call(&owner, AuthRequest::CreateBot { username: "echo_bot".into(), name: "E".into() }, T0)),
            Code::UsernameOccupied
        );
        let bot_sign_in = |token: &str| AuthRequest::BotSignIn {
            token: token.into(),
            device: bot_device.identity.device_keys(),
            device_name: "bridge".into(),
        };
        assert!(matches!(f.call(&bot_device, bot_sign_in(&issued.token), T0), AuthResponse::SignedIn { .. }));
        let forged = format!("{}:{}", issued.bot.user_id, "A".repeat(BOT_TOKEN_SECRET_LEN));
        assert_eq!(error_code(f.call(&bot_device, bot_sign_in(&forged), T0)), Code::AccessTokenInvalid);
        assert_eq!(error_code(f.call(&bot_device, bot_sign_in("garbage"), T0)), Code::AccessTokenInvalid);

        let renewed = f.service.revoke_bot_token(Some(me.user_id), issued.bot.user_id, T0 + 1).unwrap();
        assert_eq!(error_code(f.call(&bot_device, AuthRequest::RenewCert, T0 + 2)), Code::SessionRevoked);
        assert_eq!(error_code(f.call(&bot_device, bot_sign_in(&issued.token), T0 + 2)), Code::AccessTokenInvalid);
        assert!(matches!(f.call(&bot_device, bot_sign_in(&renewed.token), T0 + 2), AuthResponse::SignedIn { .. }));
        // Bots cannot manage bots.
        assert_eq!(error_code(f.call(&bot_device, AuthRequest::ListBots, T0 + 3)), Code::Forbidden);
    }

    /// `Revocations` from `relay` (a device standing in for one) with a certificate `signer` made.
    fn ask_revocations(f: &Fixture, relay: &Device, since: u64, signer: &ed25519::Keypair) -> AuthResponse {
        let relay_cert = RelayCert::issue(signer, relay.identity.peer_id(), 1, T0);
        f.call(relay, AuthRequest::Revocations { since, relay_cert }, T0 + 10)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn relays_learn_which_devices_have_a_session_and_nobody_else_does() {
        let f = fixture(Limits::default());
        let gateway = f.service.signer.clone();
        let (d1, d2, relay) = (device(), device(), device());
        let p = phone("+15550000012");
        f.login(&d1, &p, T0);
        f.login(&d2, &p, T0);
        let made_up = PeerId::random();
        let ask = |from: &Device, devices: Vec<PeerId>, signer: &ed25519::Keypair| {
            let relay_cert = RelayCert::issue(signer, from.identity.peer_id(), 1, T0);
            f.call(from, AuthRequest::DevicesExist { devices, relay_cert }, T0 + 10)
        };
        let (p1, p2) = (d1.identity.peer_id(), d2.identity.peer_id());
        let AuthResponse::Devices { existing } = ask(&relay, vec![p1, made_up, p2], &gateway) else { panic!() };
        assert_eq!(existing, vec![p1, p2]);

        // A revoked session's device no longer exists.
        let AuthResponse::Sessions(list) = f.call(&d1, AuthRequest::ListSessions, T0 + 1) else { panic!() };
        let target = list.iter().find(|s| !s.current).unwrap().session_id;
        f.call(&d1, AuthRequest::RevokeSession { session_id: target }, T0 + 1);
        let AuthResponse::Devices { existing } = ask(&relay, vec![p1, p2], &gateway) else { panic!() };
        assert_eq!(existing, vec![p1]);

        // Only relays of this network ask, and at most 256 devices at once.
        assert_eq!(error_code(ask(&d1, vec![p1], &ed25519::Keypair::generate())), Code::CertInvalid);
        let too_many = vec![p1; MAX_DEVICES_PER_QUESTION + 1];
        assert_eq!(error_code(ask(&relay, too_many, &gateway)), Code::BadRequest);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn revoked_sessions_and_relays_are_listed_signed_for_relays_only() {
        let f = fixture(Limits::default());
        let gateway = f.service.signer.clone();
        let (d1, d2, relay, other_relay) = (device(), device(), device(), device());
        let p = phone("+15550000010");
        f.login(&d1, &p, T0);
        f.login(&d2, &p, T0);
        let AuthResponse::Revocations { revocations, next, more: false } = ask_revocations(&f, &relay, 0, &gateway)
        else {
            panic!("relays get the list")
        };
        assert!(revocations.is_empty());

        let AuthResponse::Sessions(list) = f.call(&d1, AuthRequest::ListSessions, T0 + 1) else { panic!() };
        let target = list.iter().find(|s| !s.current).unwrap().session_id;
        assert!(matches!(
            f.call(&d1, AuthRequest::RevokeSession { session_id: target }, T0 + 1),
            AuthResponse::Revoked { count: 1 }
        ));
        let AuthResponse::Revocations { revocations, next: after, .. } = ask_revocations(&f, &relay, next, &gateway)
        else {
            panic!()
        };
        assert_eq!(revocations.len(), 1);
        let body = revocations[0].verify(&f.service.public_key(), T0 + 10).unwrap();
        assert_eq!((body.peer, body.revoked), (d2.identity.peer_id(), Revoked::Session(target)));
        let ttl = Limits::default().cert_ttl_secs;
        assert!(body.until >= T0 + 1 + ttl + CERT_CLOCK_SKEW_SECS, "kept until its certificates expired");
        let AuthResponse::Revocations { revocations, .. } = ask_revocations(&f, &relay, after, &gateway) else {
            panic!()
        };
        assert!(revocations.is_empty(), "asked from `next`: nothing new");

        // Not for a device, or a relay certificate another key signed.
        assert_eq!(error_code(ask_revocations(&f, &d1, 0, &ed25519::Keypair::generate())), Code::CertInvalid);

        // A revoked relay is listed for the others and gets no list itself.
        let revoked = f.service.revoke_relay(relay.identity.peer_id(), T0 + 2).unwrap();
        assert_eq!(f.service.revoke_relay(relay.identity.peer_id(), T0 + 3).unwrap().revoked_at, revoked.revoked_at);
        assert_eq!(error_code(ask_revocations(&f, &relay, 0, &gateway)), Code::CertInvalid);
        let AuthResponse::Revocations { revocations, .. } = ask_revocations(&f, &other_relay, after, &gateway) else {
            panic!()
        };
        assert_eq!(revocations.len(), 1, "revoking twice lists it once");
        assert_eq!(revocations[0].body.revoked, Revoked::Relay);

        // Signing in again on a device ends its old session: listed too. And long after, when
        // its certificates have expired, it is no longer.
        f.login(&d1, &p, T0 + 4);
        let list = |now| match f.call(
            &other_relay,
            AuthRequest::Revocations {
                since: 0,
                relay_cert: RelayCert::issue(&gateway, other_relay.identity.peer_id(), 1, now),
            },
            now,
        ) {
            AuthResponse::Revocations { revocations, .. } => {
                revocations.into_iter().map(|r| r.body.revoked).collect::<Vec<_>>()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(list(T0 + 10).len(), 3);
        assert_eq!(list(T0 + 4 + ttl + 3 * CERT_CLOCK_SKEW_SECS), vec![Revoked::Relay]);
    }
}
