#![no_main]
//! See `vfud_tests::fuzz::config_space`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfud_tests::fuzz::config_space(data);
});
