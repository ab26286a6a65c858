//! Translation through the embedded vIOMMU models as a library: the same walk the ats-dma
//! device's requests take once a device sits behind a model. Tables are built in a Vec-backed
//! guest memory the way a guest driver lays them out; the figures are a full walk (IOTLB
//! miss: every page distinct, the model freshly programmed) and an IOTLB hit (the same pages
//! again), each per translation.

use std::time::Instant;

use vfud::viommu::smmuv3::{self, regs as smmu_regs, Smmuv3, Smmuv3Properties};
use vfud::viommu::vtd::{self, Vtd, VtdConfig};

use crate::{Row, Sizes};

/// Pages translated per pass: one second-stage leaf table's worth.
const PAGES: u64 = 512;
const SID: u16 = 0x0008;

/// A legacy-mode VT-d unit translating `SID` through a 4-level second-stage table that maps
/// IOVA 0..2 MiB to 0x40_0000.., programmed as Linux does (SRTP, then TE).
fn vtd_legacy() -> (Vtd, vtd::VecGuestMemory) {
    const ROOT: u64 = 0x1000;
    const CONTEXT: u64 = 0x2000;
    const SL4: u64 = 0x3000;
    const R_W: u64 = 0b11;
    let config = VtdConfig {
        scalable_mode: false,
        first_stage: false,
        nested: false,
        pasid_bits: 0,
        ..VtdConfig::default()
    };
    let mut model = Vtd::new(config).expect("a legacy VT-d configuration");
    let mut mem = vtd::VecGuestMemory::new(0, 8 << 20);
    let mut put = |at: u64, v: u64| mem.put_u64(at, v).expect("table write");
    put(ROOT, CONTEXT | 1);
    let entry = CONTEXT + u64::from(SID & 0xff) * 16;
    put(entry, SL4 | 1); // present, TT=00 (untranslated requests), second-stage root
    put(entry + 8, 2 | (1 << 8)); // AW=2 (48-bit, 4 levels), domain 1
                                  // One table per level below the root, then the leaves.
    put(SL4, 0x4000 | R_W);
    put(0x4000, 0x5000 | R_W);
    put(0x5000, 0x6000 | R_W);
    for i in 0..PAGES {
        put(0x6000 + i * 8, (0x40_0000 + i * 0x1000) | R_W);
    }
    model
        .write64(&mut mem, vtd::RTADDR, ROOT)
        .expect("RTADDR write");
    model
        .write32(&mut mem, vtd::GCMD, vtd::GCMD_SRTP)
        .expect("GCMD write");
    model
        .write32(&mut mem, vtd::GCMD, vtd::GCMD_TE)
        .expect("GCMD write");
    assert!(model.translation_enabled(), "the VT-d model did not enable");
    (model, mem)
}

fn vtd_pass(model: &mut Vtd, mem: &mut vtd::VecGuestMemory) -> f64 {
    let t = Instant::now();
    for i in 0..PAGES {
        let req = vtd::DmaRequest {
            sid: SID,
            pasid: None,
            addr: i * 0x1000,
            write: false,
            privileged: false,
        };
        let done = model.translate_dma(mem, &req).expect("a mapped page");
        assert_eq!(done.translate(i * 0x1000), Some(0x40_0000 + i * 0x1000));
    }
    t.elapsed().as_nanos() as f64 / PAGES as f64
}

/// An SMMUv3 translating StreamID `SID` through a stage-2-only STE (4 KiB granule, 48-bit
/// IPA, start level 0) that maps IOVA 0..2 MiB to 0x40_0000.., enabled with SMMUEN.
fn smmuv3_stage2() -> (Smmuv3, smmuv3::VecMemory) {
    const STRTAB: u64 = 0x1000;
    const S2L0: u64 = 0x3000;
    const TABLE: u64 = 0b11;
    // Page: valid + page, AF, S2AP read/write.
    const PAGE_RW: u64 = 0b11 | 1 << 10 | 1 << 6 | 1 << 7;
    let mut model = Smmuv3::new(Smmuv3Properties::default()).expect("default SMMUv3");
    let mem = smmuv3::VecMemory::new(0, 8 << 20);
    let put = |at: u64, v: u64| mem.write_u64(at, v).expect("table write");
    let ste = STRTAB + u64::from(SID) * 64;
    put(ste, 1 | 6 << 1); // V, Config = stage 2 only
                          // S2VMID 1; VTCR: T0SZ 16, SL0 2 (level 0 for 4 KiB), TG 4 KiB, PS 48 bits; S2AA64, S2R.
    let vtcr: u64 = 16 | 2 << 6 | 5 << 16;
    put(ste + 16, 1 | vtcr << 32 | 1 << 51 | 1 << 58);
    put(ste + 24, S2L0);
    put(S2L0, 0x4000 | TABLE);
    put(0x4000, 0x5000 | TABLE);
    put(0x5000, 0x6000 | TABLE);
    for i in 0..PAGES {
        put(0x6000 + i * 8, (0x40_0000 + i * 0x1000) | PAGE_RW);
    }
    model.mmio_write(&mem, smmu_regs::STRTAB_BASE, 8, STRTAB);
    model.mmio_write(&mem, smmu_regs::STRTAB_BASE_CFG, 4, 4); // linear, 16 entries
    model.mmio_write(&mem, smmu_regs::CR0, 4, u64::from(smmu_regs::CR0_SMMUEN));
    assert_eq!(
        model.mmio_read(smmu_regs::CR0ACK, 4),
        u64::from(smmu_regs::CR0_SMMUEN),
        "the SMMUv3 model did not enable"
    );
    (model, mem)
}

fn smmuv3_pass(model: &mut Smmuv3, mem: &smmuv3::VecMemory) -> f64 {
    let t = Instant::now();
    for i in 0..PAGES {
        let req = smmuv3::DmaRequest {
            sid: u32::from(SID),
            ssid: None,
            address: i * 0x1000,
            access: smmuv3::Access::default(),
        };
        let done = model
            .translate_dma(mem, &req)
            .unwrap_or_else(|e| panic!("page {i}: {e:?}"));
        assert_eq!(done.address, 0x40_0000 + i * 0x1000);
    }
    t.elapsed().as_nanos() as f64 / PAGES as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn push_model_rows(rows: &mut Vec<Row>, model: &str, walk: f64, hit: f64) {
    rows.push(Row {
        name: format!("viommu.{model}.translations_per_s.full_walk"),
        value: 1e9 / walk,
        unit: "/s",
        baseline: None,
        p99: None,
    });
    rows.push(Row {
        name: format!("viommu.{model}.translations_per_s.iotlb_hit"),
        value: 1e9 / hit,
        unit: "/s",
        baseline: Some(("full walk".into(), 1e9 / walk)),
        p99: None,
    });
}

pub(crate) fn smmuv3(s: &Sizes, rows: &mut Vec<Row>) {
    let (mut walks, mut hits) = (Vec::new(), Vec::new());
    for _ in 0..s.ats_runs {
        let (mut model, mem) = smmuv3_stage2();
        walks.push(smmuv3_pass(&mut model, &mem));
        hits.push(smmuv3_pass(&mut model, &mem));
    }
    push_model_rows(rows, "smmuv3", median(&mut walks), median(&mut hits));
}

pub(crate) fn vtd(s: &Sizes, rows: &mut Vec<Row>) {
    let (mut walks, mut hits) = (Vec::new(), Vec::new());
    for _ in 0..s.ats_runs {
        let (mut model, mut mem) = vtd_legacy();
        walks.push(vtd_pass(&mut model, &mut mem));
        hits.push(vtd_pass(&mut model, &mut mem));
    }
    push_model_rows(rows, "vtd", median(&mut walks), median(&mut hits));
}
