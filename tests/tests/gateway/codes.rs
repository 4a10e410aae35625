//! Login codes: wrong, reused and expired codes, the wrong-attempt lockout, and the limit on
//! code requests per phone.

use std::cell::RefCell;
use std::thread;
use std::time::Duration;

use meshgram_node::crypto::identity::DEVICE_KEY_FILE;
use meshgram_tests::{Gateway, meshgram, meshgram_stdin, wrong_code};

use crate::{ALICE, BOB};

/// Asserts `code` is `len` ASCII digits.
fn assert_code_shape(code: &str, len: usize) {
    assert!(code.len() == len && code.chars().all(|c| c.is_ascii_digit()), "code {code:?} is not {len} digits");
}

#[test]
fn wrong_code_is_refused_and_creates_no_account() {
    let gw = Gateway::start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));
    gw.login(&alice_p, ALICE);
    assert_code_shape(&gw.codes_for(ALICE)[0], 5);

    gw.login_with(&bob_p, BOB, &[], |code| vec![wrong_code(code)]).expect_err(&["PHONE_CODE_INVALID"]);
    meshgram(&bob_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
    meshgram(&alice_p, &["lookup", BOB]).expect_err(&["NOT_FOUND"]);

    let bob = gw.login(&bob_p, BOB);
    assert_eq!(bob["new_account"], true, "{bob}");
}

#[test]
fn used_code_cannot_be_used_again() {
    let gw = Gateway::start();
    let (first_p, second_p) = (gw.new_profile("alice1"), gw.new_profile("alice2"));
    gw.login(&first_p, ALICE);
    let used = gw.codes_for(ALICE)[0].clone();

    let fresh = RefCell::new(String::new());
    let out = gw.login_with(&second_p, ALICE, &[], |code| {
        fresh.replace(code.to_string());
        vec![used.clone()]
    });
    // One chance in 10^5 that the new code equals the old one; then signing in is right.
    if *fresh.borrow() != used {
        out.expect_err(&["PHONE_CODE_INVALID", "PHONE_CODE_EXPIRED"]);
        meshgram(&second_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
    }
}

#[test]
fn expired_code_is_refused() {
    let gw = Gateway::builder().arg("--code-ttl-secs").arg("1").start();
    let alice_p = gw.new_profile("alice");
    let out = gw.login_with(&alice_p, ALICE, &[], |code| {
        // Three seconds, not two: either end may round the 1 s lifetime up to whole seconds.
        thread::sleep(Duration::from_secs(3));
        vec![code.to_string()]
    });
    out.expect_err(&["PHONE_CODE_EXPIRED"]);
    meshgram(&alice_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
}

#[test]
fn too_many_wrong_codes_lock_the_phone() {
    let gw =
        Gateway::builder().config("[limits]\nmax_code_attempts = 3\nsend_code_burst = 20\ncode_length = 6\n").start();
    let (alice_p, bob_p) = (gw.new_profile("alice"), gw.new_profile("bob"));

    // Each `login` requests a new code, so the count must be per phone and device, not per code.
    for attempt in 1..=3 {
        let out = gw.login_with(&alice_p, ALICE, &[], |code| {
            assert_code_shape(code, 6);
            vec![wrong_code(code)]
        });
        // The attempt that reaches the limit may already say FLOOD_WAIT.
        if attempt < 3 {
            out.expect_err(&["PHONE_CODE_INVALID"]);
        } else {
            out.expect_err(&["PHONE_CODE_INVALID", "FLOOD_WAIT"]);
        }
    }

    // Locked: even the right code is refused now (whether SendCode or SignIn says so).
    let out = gw.login_with(&alice_p, ALICE, &[], |code| vec![code.to_string()]);
    out.expect_flood_wait(900);
    meshgram(&alice_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);

    // The lockout is per phone.
    let bob = gw.login(&bob_p, BOB);
    assert_eq!(bob["new_account"], true, "{bob}");
}

#[test]
fn wrong_codes_lock_out_the_guessing_device_not_the_owner() {
    let mut gw = Gateway::builder().config("[limits]\nmax_code_attempts = 3\nsend_code_burst = 20\n").start();
    let (mallory_p, alice_p) = (gw.new_profile("mallory"), gw.new_profile("alice"));

    // Someone else's device asks for codes to Alice's number and guesses until locked out.
    for _ in 1..=3 {
        gw.login_with(&mallory_p, ALICE, &[], |code| vec![wrong_code(code)])
            .expect_err(&["PHONE_CODE_INVALID", "FLOOD_WAIT"]);
    }
    gw.login_with(&mallory_p, ALICE, &[], |code| vec![code.to_string()]).expect_flood_wait(900);
    meshgram(&mallory_p, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);

    // Alice, on her own device, gets her code and signs in at once.
    let alice = gw.login(&alice_p, ALICE);
    assert_eq!(alice["new_account"], true, "{alice}");

    // A kill -9 and restart keep the guesser locked out (the count is on disk).
    gw.restart_same_port();
    gw.login_with(&mallory_p, ALICE, &[], |code| vec![code.to_string()]).expect_flood_wait(900);
}

#[test]
fn code_requests_per_phone_are_limited() {
    let gw = Gateway::builder().config("[limits]\nsend_code_burst = 2\n").start();
    for i in 1..=2 {
        gw.login(&gw.new_profile(&format!("alice{i}")), ALICE);
    }
    assert_eq!(gw.codes_for(ALICE).len(), 2);

    let third = gw.new_profile("alice3");
    let out =
        gw.login_with(&third, ALICE, &[], |code| panic!("a third code {code} was sent despite send_code_burst = 2"));
    out.expect_flood_wait(600);
    assert_eq!(gw.codes_for(ALICE).len(), 2, "no third code was sent");

    gw.login(&gw.new_profile("bob"), BOB);
}

#[test]
fn malformed_phone_is_refused() {
    let gw = Gateway::start();
    let profile = gw.new_profile("nobody");
    let out = meshgram_stdin(&profile, &["login", "--gateway", &gw.addr(), "--phone", "12345"], "00000\n");
    out.expect_err(&["PHONE_NUMBER_INVALID", "USAGE"]);
    assert!(gw.codes_for("12345").is_empty() && gw.codes_for("+12345").is_empty(), "no code was sent");
    meshgram(&profile, &["whoami"]).expect_err(&["NOT_SIGNED_IN"]);
}

#[test]
fn code_requests_per_device_are_limited_whatever_the_numbers() {
    let gw = Gateway::builder().config("[limits]\nsend_code_device_burst = 2\n").start();
    // One device walking a range of numbers (SMS pumping): two codes, then FLOOD_WAIT. The
    // profiles share one device key, so the gateway sees one device.
    let first = gw.new_profile("pump-0");
    let numbers = ["+15550009001", "+15550009002", "+15550009003"];
    gw.login(&first, numbers[0]);
    let same_device = |i: usize| {
        let profile = gw.new_profile(&format!("pump-{i}"));
        std::fs::create_dir_all(&profile).unwrap();
        std::fs::copy(first.join(DEVICE_KEY_FILE), profile.join(DEVICE_KEY_FILE)).unwrap();
        profile
    };
    gw.login(&same_device(1), numbers[1]);
    let out =
        gw.login_with(&same_device(2), numbers[2], &[], |code| panic!("a third code {code} went to a third number"));
    out.expect_flood_wait(60);
    assert!(gw.codes_for(numbers[2]).is_empty(), "no code was sent to the third number");
    // Another device is not held back by it.
    gw.login(&gw.new_profile("alice"), ALICE);
}

#[test]
fn a_slow_sms_provider_holds_only_its_delivery_slots() {
    let gw = Gateway::builder()
        .slow_webhook(200, Duration::from_secs(4))
        .config("[limits]\nmax_webhook_deliveries = 1\n")
        .start();
    let alice_p = gw.new_profile("alice");
    gw.login(&alice_p, ALICE);
    // Bob's code is with the slow provider; Carol is told to come back at once, not queued.
    let bob_p = gw.new_profile("bob");
    let bob = std::thread::scope(|s| {
        let bob = s.spawn(|| gw.login(&bob_p, BOB));
        thread::sleep(Duration::from_millis(1500));
        let started = std::time::Instant::now();
        let carol = gw.login_with(&gw.new_profile("carol"), "+15550003333", &[], |code| panic!("{code} sent"));
        carol.expect_flood_wait(5);
        assert!(started.elapsed() < Duration::from_secs(3), "refused at once: {:?}", started.elapsed());
        // Signed-in users are served meanwhile.
        meshgram(&alice_p, &["whoami"]).ok_json();
        bob.join().unwrap()
    });
    assert_eq!(bob["new_account"], true, "{bob}");
}

#[test]
fn code_requests_per_address_are_limited() {
    // Loopback counts here (it does not by default: the gateway's own machine signs in from it).
    let gw = Gateway::builder().config("[limits]\nsend_code_ip_burst = 2\nlimit_loopback = true\n").start();
    gw.login(&gw.new_profile("alice"), ALICE);
    gw.login(&gw.new_profile("bob"), BOB);
    let out = gw.login_with(&gw.new_profile("carol"), "+15550003333", &[], |code| panic!("a third code {code}"));
    let error = out.expect_err(&["FLOOD_WAIT"]);
    assert!(error["message"].as_str().unwrap().contains("address"), "{error}");
}
