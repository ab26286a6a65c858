#![no_main]
//! See `vfud_tests::fuzz::viommu_smmuv3`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vfud_tests::fuzz::viommu_smmuv3(data);
});
