#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgram_node::fuzzing::mailbox_messages(data));
