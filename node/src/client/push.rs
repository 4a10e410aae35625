//! Push: this device's Web Push endpoint, registered with the relays that hold its mailbox, so
//! that one of them wakes the app when something arrives while it is not connected (the relay
//! side is `meshgram_relay::push`).
//!
//! Group posts are stored on the group's own relays, not the member's mailbox relays: before
//! reading groups the device tells each relay it reads from which groups to wake it for
//! (`PushGroups`), so that exactly the relay it reads a group from wakes it for that group.
//!
//! The subscription is kept in the profile (`push.json`) and sent again each time this device
//! greets one of its mailbox relays, so that relays newly responsible for its mailbox (placement
//! moves as relays come and go) learn it the next time the device is online. A relay whose push
//! service said the subscription is gone refuses it (`NOT_FOUND`), and the device drops it.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::client::messaging::{MessagingError, Messenger};
use crate::defaults::RELAY_ANSWER_DEADLINE;
use crate::proto::group::GroupId;
use crate::proto::mailbox::PushEndpoint;
use crate::proto::{ErrorCode, MailboxRequest, MailboxResponse, RelayInfo};

/// The subscription's file in the profile.
pub const PUSH_FILE: &str = "push.json";
/// The relays told which groups to wake this device for, and those groups, in the profile: a
/// later process tells a relay it no longer reads a group from, and unregistering reaches them.
const PUSH_GROUPS_FILE: &str = "push-groups.json";

/// The relays told which groups to wake this device for.
pub(crate) type PushGroupsTold = HashMap<PeerId, (RelayInfo, Vec<GroupId>)>;

/// The profile's [`PushGroupsTold`] (none if unreadable: relays are then told afresh).
pub(crate) fn load_groups_told(profile: &Path) -> PushGroupsTold {
    let Ok(bytes) = std::fs::read(profile.join(PUSH_GROUPS_FILE)) else { return HashMap::new() };
    let told: Vec<(RelayInfo, Vec<GroupId>)> = serde_json::from_slice(&bytes).unwrap_or_default();
    told.into_iter().map(|(relay, groups)| (relay.peer_id, (relay, groups))).collect()
}

fn save_groups_told(profile: &Path, told: &PushGroupsTold) -> Result<(), MessagingError> {
    let path = profile.join(PUSH_GROUPS_FILE);
    let list: Vec<&(RelayInfo, Vec<GroupId>)> = told.values().collect();
    let json = serde_json::to_vec(&list).map_err(|e| MessagingError::File(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| MessagingError::File(format!("{}: {e}", path.display())))
}

/// A Web Push subscription as push services and browsers hand it out: the endpoint URL and the
/// keys, base64url.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushSubscription {
    pub url: String,
    pub p256dh: String,
    pub auth: String,
}

/// What a mailbox relay holds of this device's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRelay {
    pub relay: PeerId,
    /// The endpoint URL it holds for this device, if any.
    pub endpoint: Option<String>,
    /// Why it could not be asked or told, if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PushSubscription {
    /// The endpoint the relays are given, every field checked.
    pub fn to_endpoint(&self) -> Result<PushEndpoint, MessagingError> {
        let decode = |name: &str, value: &str| {
            // Subscriptions are base64url; some tools pad them or use the standard alphabet.
            let value = value.trim_end_matches('=').replace('+', "-").replace('/', "_");
            URL_SAFE_NO_PAD.decode(value).map_err(|e| MessagingError::BadPush(format!("{name} is not base64url: {e}")))
        };
        let endpoint = PushEndpoint {
            url: self.url.clone(),
            p256dh: decode("p256dh", &self.p256dh)?,
            auth: decode("auth", &self.auth)?,
        };
        endpoint.validate().map_err(MessagingError::BadPush)?;
        Ok(endpoint)
    }

    /// The profile's subscription, if it has one.
    pub fn load(profile: &Path) -> Result<Option<Self>, MessagingError> {
        match std::fs::read(profile.join(PUSH_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| MessagingError::File(format!("{}: {e}", profile.join(PUSH_FILE).display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MessagingError::File(format!("{}: {e}", profile.join(PUSH_FILE).display()))),
        }
    }

    fn save(&self, profile: &Path) -> Result<(), MessagingError> {
        let path = profile.join(PUSH_FILE);
        let json = serde_json::to_vec_pretty(self).map_err(|e| MessagingError::File(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| MessagingError::File(format!("{}: {e}", path.display())))
    }

    fn remove(profile: &Path) -> Result<(), MessagingError> {
        match std::fs::remove_file(profile.join(PUSH_FILE)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(MessagingError::File(e.to_string())),
        }
    }
}

impl Messenger {
    /// Registers `subscription` with every relay holding this device's mailbox and keeps it in
    /// the profile (so it is sent again as those relays change). Fails only if no relay took it.
    pub async fn push_register(&mut self, subscription: PushSubscription) -> Result<Vec<PushRelay>, MessagingError> {
        let endpoint = subscription.to_endpoint()?;
        let relays = self.tell_mailbox_relays(Some(endpoint.clone())).await?;
        // Kept once a relay took it: one every relay refused leaves the old one in place.
        subscription.save(self.client.profile())?;
        self.push = Some(endpoint);
        // The group relays get the new endpoint with the next read.
        for (_, groups) in self.push_groups_told.values_mut() {
            groups.clear();
        }
        Ok(relays)
    }

    /// Removes this device's subscription from its mailbox relays (and the relays it reads
    /// groups from) and the profile.
    pub async fn push_unregister(&mut self) -> Result<Vec<PushRelay>, MessagingError> {
        PushSubscription::remove(self.client.profile())?;
        self.push = None;
        let relays = self.tell_mailbox_relays(None).await?;
        // The relays it reads groups from forget it too (best effort: one that is down is told
        // by the next unregistering, and drops it when it expires).
        let group_relays: Vec<RelayInfo> = self.push_groups_told.values().map(|(relay, _)| relay.clone()).collect();
        for relay in group_relays {
            if relays.iter().any(|r| r.relay == relay.peer_id) {
                self.push_groups_told.remove(&relay.peer_id);
                continue;
            }
            let request = MailboxRequest::SetPush { push: None };
            match self.relay_call(&relay, request, RELAY_ANSWER_DEADLINE).await {
                Ok(_) => {
                    self.push_groups_told.remove(&relay.peer_id);
                }
                Err(e) => {
                    tracing::warn!(relay = %relay.peer_id, error = %e, "could not remove the push endpoint there")
                }
            }
        }
        save_groups_told(self.client.profile(), &self.push_groups_told)?;
        Ok(relays)
    }

    /// The profile's subscription, and whether each mailbox relay holds it.
    pub async fn push_status(&mut self) -> Result<(Option<PushSubscription>, Vec<PushRelay>), MessagingError> {
        let subscription = PushSubscription::load(self.client.profile())?;
        let mut relays = Vec::new();
        for relay in self.current_mailbox_relays().await? {
            let status = match self.relay_call(&relay, MailboxRequest::GetPush, RELAY_ANSWER_DEADLINE).await {
                Ok(MailboxResponse::Push { push }) => {
                    PushRelay { relay: relay.peer_id, endpoint: push.map(|p| p.url), error: None }
                }
                Ok(_) => unexpected(relay.peer_id),
                Err(e) => PushRelay { relay: relay.peer_id, endpoint: None, error: Some(e.to_string()) },
            };
            relays.push(status);
        }
        Ok((subscription, relays))
    }

    /// Sends `SetPush` to each mailbox relay. If none took it: their refusal, when one refused
    /// (a definitive answer, such as an endpoint it does not send to), else `NoRelay`.
    async fn tell_mailbox_relays(&mut self, push: Option<PushEndpoint>) -> Result<Vec<PushRelay>, MessagingError> {
        let (mut relays, mut refusal) = (Vec::new(), None);
        for relay in self.current_mailbox_relays().await? {
            let request = MailboxRequest::SetPush { push: push.clone() };
            let status = match self.relay_call(&relay, request, RELAY_ANSWER_DEADLINE).await {
                Ok(MailboxResponse::PushSet) => {
                    PushRelay { relay: relay.peer_id, endpoint: push.as_ref().map(|p| p.url.clone()), error: None }
                }
                Ok(MailboxResponse::Error(e)) | Err(MessagingError::Refused(e)) => {
                    let status = PushRelay { relay: relay.peer_id, endpoint: None, error: Some(e.to_string()) };
                    refusal = Some(e);
                    status
                }
                Ok(_) => unexpected(relay.peer_id),
                Err(e) => PushRelay { relay: relay.peer_id, endpoint: None, error: Some(e.to_string()) },
            };
            relays.push(status);
        }
        if relays.iter().all(|r| r.error.is_some()) {
            if let Some(refusal) = refusal {
                return Err(MessagingError::Refused(refusal));
            }
            let why = relays.iter().filter_map(|r| r.error.clone()).collect::<Vec<_>>().join("; ");
            return Err(MessagingError::NoRelay(why));
        }
        Ok(relays)
    }

    /// The relays holding this device's mailbox, asked afresh.
    async fn current_mailbox_relays(&mut self) -> Result<Vec<RelayInfo>, MessagingError> {
        self.refresh_mailbox_relays().await?;
        Ok(self.mailbox_relays.clone())
    }

    /// About to read `reads` (each relay, and the groups read there): if the device has a push
    /// subscription, tells each relay the groups to wake it for, those it no longer reads there
    /// included (best effort: the next read tries again).
    pub(crate) async fn push_groups(&mut self, mut reads: Vec<(RelayInfo, Vec<GroupId>)>) {
        let Some(push) = self.push.clone() else { return };
        let mut changed = false;
        for (relay, told) in &self.push_groups_told {
            if !reads.iter().any(|(r, _)| r.peer_id == *relay) && !told.1.is_empty() {
                reads.push((told.0.clone(), Vec::new()));
            }
        }
        for (relay, mut groups) in reads {
            groups.sort_unstable();
            if self.push_groups_told.get(&relay.peer_id).is_some_and(|(_, told)| *told == groups) {
                continue;
            }
            // The reader greeted every relay of `reads`; one it no longer reads from may need it.
            if let Err(e) = self.greet(&relay).await {
                tracing::warn!(relay = %relay.peer_id, error = %e, "could not tell the relay which groups to wake for");
                continue;
            }
            let request = MailboxRequest::PushGroups { push: push.clone(), groups: groups.clone() };
            if self.push_request(&relay, request).await {
                self.push_groups_told.insert(relay.peer_id, (relay, groups));
                changed = true;
            }
        }
        if changed && let Err(e) = save_groups_told(self.client.profile(), &self.push_groups_told) {
            tracing::warn!(error = %e, "could not keep which relays wake this device for its groups");
        }
    }

    /// Sends a push registration to `relay`; whether it took it. A relay whose push service said
    /// the subscription is gone refuses it (`NOT_FOUND`): it would never wake us again, so the
    /// device drops it.
    async fn push_request(&mut self, relay: &RelayInfo, request: MailboxRequest) -> bool {
        match tokio::time::timeout(RELAY_ANSWER_DEADLINE, self.client.mailbox_request(relay, request)).await {
            Ok(Ok(MailboxResponse::PushSet)) => return true,
            Ok(Ok(MailboxResponse::Error(e))) if e.code == ErrorCode::NotFound => {
                tracing::warn!(relay = %relay.peer_id, error = %e, "the push subscription is gone; dropping it");
                self.push = None;
                if let Err(e) = PushSubscription::remove(self.client.profile()) {
                    tracing::warn!(error = %e, "could not remove the gone push subscription");
                }
            }
            Ok(Ok(other)) => tracing::warn!(relay = %relay.peer_id, ?other, "the relay did not take the push endpoint"),
            Ok(Err(e)) => {
                tracing::warn!(relay = %relay.peer_id, error = %e, "could not give the relay the push endpoint")
            }
            Err(_) => tracing::warn!(relay = %relay.peer_id, "the relay did not answer the push endpoint in time"),
        }
        false
    }

    /// Just greeted `relay`: if it holds this device's mailbox and the device has a push
    /// subscription, gives it the subscription (best effort: the next greeting tries again).
    pub(crate) async fn push_after_greeting(&mut self, relay: &RelayInfo) {
        let Some(push) = self.push.clone() else { return };
        if !self.mailbox_relays.iter().any(|r| r.peer_id == relay.peer_id) {
            return;
        }
        self.push_request(relay, MailboxRequest::SetPush { push: Some(push) }).await;
    }
}

fn unexpected(relay: PeerId) -> PushRelay {
    PushRelay { relay, endpoint: None, error: Some("unexpected answer".into()) }
}
