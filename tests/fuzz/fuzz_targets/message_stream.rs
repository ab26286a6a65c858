#![no_main]
//! See `vfud_tests::fuzz::message_stream`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfud_tests::fuzz::message_stream(data);
});
