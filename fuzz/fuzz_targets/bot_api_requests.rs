#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgram_bot_bridge::fuzzing::bot_api_requests(data));
