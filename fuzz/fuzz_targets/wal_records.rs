#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgram_relay::fuzzing::wal_records(data));
