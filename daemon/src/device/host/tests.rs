//! The host backend over the fake kernel: the error paths, the policy inputs, DMA mirroring,
//! IRQs, regions and detach.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use vfu_protocol::reply::RegionCap;
use vfu_protocol::request::{IrqAction, IrqData, SetIrqsRequest};
use vfu_protocol::wire;

use super::fake::{FakeKernel, FakeState, BAR4_SIZE};
use super::locate::{locate, LocateError, SystemPaths};
use super::*;
use crate::dma::{DmaProt, MappedRegion, MappingCache};

fn config(device: &str) -> vfu_config::DeviceConfig {
    vfu_config::parse_str(
        &format!(r#"{{"version": 1, "name": "nic0", "socket": "/run/vfud/nic0.sock", "device": {device}}}"#),
        None,
    )
    .expect("config")
}

const AUTO: &str = r#"{"type": "host", "pci": "0000:01:00.0"}"#;

fn open(device: &str, state: FakeState) -> (Result<HostPciDevice, HostDeviceError>, FakeKernel) {
    let kernel = FakeKernel::new(state);
    let d = HostPciDevice::with_kernel(
        &config(device),
        "0000:01:00.0",
        Box::new(kernel.clone()),
        &mut Resolver::new(),
    );
    (d, kernel)
}

fn guest_has_ats(d: &HostPciDevice) -> bool {
    let mut config = vec![0u8; 4096];
    d.region_read(7, 0, &mut config).expect("config read");
    crate::pci::CapabilityChain::parse(&config)
        .expect("guest chain")
        .find_extended(0x000f)
        .is_some()
}

#[test]
fn bind_failure_names_the_device_and_the_user_holding_it() {
    let (d, _) = open(
        AUTO,
        FakeState {
            fail_bind: Some(Errno::EBUSY),
            ..Default::default()
        },
    );
    let e = d.expect_err("bind fails");
    let text = e.to_string();
    assert!(
        matches!(
            e,
            HostDeviceError::Bind {
                source: Errno::EBUSY,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        text.contains("nic0") && text.contains("0000:01:00.0") && text.contains("in use"),
        "{text}"
    );

    let (d, _) = open(
        AUTO,
        FakeState {
            fail_bind: Some(Errno::ENOTTY),
            ..Default::default()
        },
    );
    let text = d.expect_err("bind fails").to_string();
    assert!(
        text.contains("CONFIG_IOMMUFD") && text.contains("CONFIG_VFIO_DEVICE_CDEV"),
        "{text}"
    );
}

#[test]
fn hw_info_unsupported_leaves_ats_exposed_with_auto() {
    for errno in [Errno::ENOTTY, Errno::EOPNOTSUPP] {
        let (d, _) = open(
            AUTO,
            FakeState {
                hw_info: Err(errno),
                ..Default::default()
            },
        );
        let d = d.expect("an old kernel is no error");
        assert_eq!(d.hw_info(), None);
        assert!(
            guest_has_ats(&d),
            "{errno}: auto exposes ATS when nothing is reported"
        );
    }
    // Any other failure of GET_HW_INFO is an error, not a silent default.
    let (d, _) = open(
        AUTO,
        FakeState {
            hw_info: Err(Errno::EIO),
            ..Default::default()
        },
    );
    assert!(matches!(d, Err(HostDeviceError::HwInfo { .. })));
}

#[test]
fn ats_follows_the_policy_and_what_the_kernel_reports() {
    let not_supported = || FakeState {
        hw_info: Ok(HostHwInfo {
            capabilities: HostIommuCaps::HW_CAP_PCI_ATS_NOT_SUPPORTED,
            max_pasid_log2: 0,
            iommu: HostIommuHwInfo::Other { data_type: 0 },
        }),
        ..Default::default()
    };
    let (d, _) = open(AUTO, FakeState::default());
    let d = d.expect("auto");
    assert!(guest_has_ats(&d));
    assert!(matches!(
        d.hw_info().map(|h| h.iommu),
        Some(HostIommuHwInfo::IntelVtd { .. })
    ));

    let (d, _) = open(
        r#"{"type": "host", "pci": "0000:01:00.0", "ats": "off"}"#,
        FakeState::default(),
    );
    assert!(!guest_has_ats(&d.expect("off")));

    let (d, _) = open(AUTO, not_supported());
    assert!(!guest_has_ats(&d.expect("auto with ATS unusable")));

    let (d, _) = open(
        r#"{"type": "host", "pci": "0000:01:00.0", "ats": "on"}"#,
        not_supported(),
    );
    let e = d.expect_err("on with ATS unusable");
    assert!(matches!(e, HostDeviceError::ApplyPolicy(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("nic0") && text.contains("IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED"),
        "{text}"
    );
}

#[test]
fn ats_control_writes_stay_virtual_and_other_writes_reach_the_device() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    d.region_write(7, 0x106, &0x8000u16.to_le_bytes())
        .expect("ATS enable");
    assert!(
        kernel.state.lock().unwrap().config_writes.is_empty(),
        "ATS control is emulated"
    );
    assert!(d.decisions().ats.exposed);
    let mut back = [0u8; 2];
    d.region_read(7, 0x106, &mut back).expect("read back");
    assert_eq!(u16::from_le_bytes(back), 0x8000);
    d.region_write(7, 0x04, &0x0006u16.to_le_bytes())
        .expect("command register");
    assert_eq!(
        kernel.state.lock().unwrap().config_writes,
        vec![(0x04, vec![0x06, 0x00])]
    );
}

fn dma_region(iova: u64, size: u64, prot: DmaProt) -> (DmaRegion, OwnedFd) {
    let fd = memfd_create(c"vfud-host-test", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&fd, size as i64).expect("size");
    // As the server's table does once a host device attached: files are kept for MAP_FILE.
    let mut cache = MappingCache::new(4);
    cache.set_keep_files(true);
    let mapped = MappedRegion::map_shared(&mut cache, &fd, 0, size, prot).expect("map");
    (
        DmaRegion::new(iova, size, prot, DmaBacking::Mapped(mapped)),
        fd,
    )
}

const RW: DmaProt = DmaProt {
    read: true,
    write: true,
};

#[test]
fn dma_maps_go_to_the_ioas_with_the_clients_iova_and_permissions() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    let (rw, _f1) = dma_region(0x10_0000, 0x4000, RW);
    d.dma_mapped(&rw).expect("map");
    let ro_prot = DmaProt {
        read: true,
        write: false,
    };
    let (ro, _f2) = dma_region(0x20_0000, 0x1000, ro_prot);
    d.dma_mapped(&ro).expect("map");
    let fixed = iommufd_sys::IOMMU_IOAS_MAP_FIXED_IOVA;
    let r = iommufd_sys::IOMMU_IOAS_MAP_READABLE;
    let w = iommufd_sys::IOMMU_IOAS_MAP_WRITEABLE;
    assert_eq!(
        kernel.state.lock().unwrap().maps,
        vec![
            ("file", 0x10_0000, 0x4000, fixed | r | w),
            ("file", 0x20_0000, 0x1000, fixed | r)
        ]
    );
    d.dma_unmapped(&rw).expect("IOAS unmap");
    assert_eq!(
        kernel.state.lock().unwrap().unmaps,
        vec![(0x10_0000, 0x4000)]
    );
    // A region that was never mirrored is not unmapped.
    let (other, _f3) = dma_region(0x30_0000, 0x1000, RW);
    d.dma_unmapped(&other).expect("nothing to unmap");
    assert_eq!(kernel.state.lock().unwrap().unmaps.len(), 1);
    // A failed IOAS unmap is an error: the client must not be told the range is gone.
    kernel.state.lock().unwrap().fail_unmap = Some(Errno::EINVAL);
    let e = d.dma_unmapped(&ro).expect_err("IOAS unmap fails");
    assert_eq!(e.errno(), Errno::EINVAL);
    assert!(e.to_string().contains("IOMMU_IOAS_UNMAP"), "{e}");
}

#[test]
fn a_region_without_a_kept_file_is_mapped_by_address() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    let fd = memfd_create(c"vfud-host-test", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&fd, 0x2000).expect("size");
    let mapped = MappedRegion::map(&fd, 0, 0x2000, RW).expect("map");
    assert!(mapped.backing_file().is_none());
    let r = DmaRegion::new(0x10_0000, 0x2000, RW, DmaBacking::Mapped(mapped));
    d.dma_mapped(&r).expect("map by address");
    assert_eq!(kernel.state.lock().unwrap().maps[0].0, "user");
}

#[test]
fn map_file_unsupported_falls_back_to_mapping_our_address() {
    let (d, kernel) = open(
        AUTO,
        FakeState {
            fail_map_file: Some(Errno::ENOTTY),
            ..Default::default()
        },
    );
    let d = d.expect("device");
    let (a, _f) = dma_region(0x10_0000, 0x2000, RW);
    d.dma_mapped(&a).expect("fallback map");
    assert_eq!(kernel.state.lock().unwrap().maps[0].0, "user");
    // An old kernel stays old: later maps go straight to IOMMU_IOAS_MAP.
    kernel.state.lock().unwrap().fail_map_file = None;
    let (b, _g) = dma_region(0x20_0000, 0x2000, RW);
    d.dma_mapped(&b).expect("map");
    assert_eq!(kernel.state.lock().unwrap().maps[1].0, "user");
}

#[test]
fn pinning_failure_is_an_error_that_names_the_memlock_limit_and_the_device_lives_on() {
    let (d, kernel) = open(
        AUTO,
        FakeState {
            fail_map_file: Some(Errno::ENOMEM),
            ..Default::default()
        },
    );
    let d = d.expect("device");
    let (a, _f) = dma_region(0x10_0000, 0x2000, RW);
    let e = d.dma_mapped(&a).expect_err("pinning fails");
    assert_eq!(e.errno(), Errno::ENOMEM);
    let text = e.to_string();
    assert!(
        text.contains("RLIMIT_MEMLOCK")
            && text.contains("LimitMEMLOCK")
            && text.contains("CAP_IPC_LOCK"),
        "{text}"
    );
    // Nothing was recorded as mirrored, so the rollback's unmap does not reach the kernel.
    d.dma_unmapped(&a).expect("IOAS unmap");
    assert!(kernel.state.lock().unwrap().unmaps.is_empty());
    // The device keeps serving: the next map (with the limit raised) works.
    kernel.state.lock().unwrap().fail_map_file = None;
    d.dma_mapped(&a).expect("map after the limit was raised");
    let mut buf = [0u8; 4];
    d.region_read(4, 0x10, &mut buf).expect("BAR read");
    assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
}

#[test]
fn message_backed_maps_are_accepted_but_not_mirrored() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    let r = DmaRegion::new(0x1000, 0x1000, RW, DmaBacking::Message);
    d.dma_mapped(&r).expect("accepted");
    d.dma_unmapped(&r).expect("IOAS unmap");
    let s = kernel.state.lock().unwrap();
    assert!(s.maps.is_empty() && s.unmaps.is_empty());
}

fn bar4_areas(d: &HostPciDevice) -> Vec<(u64, u64)> {
    let spec = d.region(4).expect("BAR4");
    assert!(
        spec.fd.is_some(),
        "an mmap-able BAR comes with the device fd"
    );
    assert_eq!(spec.description.offset, super::fake::region_offset(4));
    match &spec.description.caps[..] {
        [RegionCap::SparseMmap(areas)] => areas.iter().map(|a| (a.offset, a.size)).collect(),
        other => panic!("caps {other:?}"),
    }
}

#[test]
fn bars_are_mmapped_around_the_msix_table_unless_the_kernel_allows_it() {
    let (d, _) = open(AUTO, FakeState::default());
    assert_eq!(bar4_areas(&d.expect("device")), vec![(0, 0x3000)]);
    let (d, _) = open(
        AUTO,
        FakeState {
            msix_mappable: true,
            ..Default::default()
        },
    );
    assert_eq!(bar4_areas(&d.expect("device")), vec![(0, BAR4_SIZE)]);
    let (d, _) = open(
        AUTO,
        FakeState {
            sparse_areas: Some(vec![(0, 0x1000), (0x2000, 0x1000), (0x3000, 0x9000)]),
            ..Default::default()
        },
    );
    // The kernel's areas, minus one that does not fit in the BAR.
    assert_eq!(
        bar4_areas(&d.expect("device")),
        vec![(0, 0x1000), (0x2000, 0x1000)]
    );
}

#[test]
fn bar_mmap_off_traps_every_bar_and_never_hands_out_the_device_fd() {
    let (d, _) = open(
        r#"{"type": "host", "pci": "0000:01:00.0", "bar_mmap": false}"#,
        FakeState::default(),
    );
    let d = d.expect("device");
    for index in 0..6 {
        if let Some(r) = d.region(index) {
            assert_eq!(
                r.description.flags & wire::REGION_FLAG_MMAP,
                0,
                "BAR {index}"
            );
            assert!(r.description.caps.is_empty(), "BAR {index}");
            assert!(r.fd.is_none(), "BAR {index} must not carry the device fd");
        }
    }
    // Trapped accesses still reach the device.
    let mut buf = [0u8; 4];
    d.region_read(4, 0, &mut buf).expect("trapped BAR read");
}

#[test]
fn regions_the_kernel_lacks_are_empty_and_accesses_are_range_checked() {
    let (d, _) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    assert_eq!(d.info().num_regions, 9);
    assert_eq!(d.region(8).expect("VGA").description.size, 0);
    assert!(d.region(9).is_none());
    let mut buf = [0u8; 8];
    assert!(matches!(
        d.region_read(4, BAR4_SIZE - 4, &mut buf),
        Err(DeviceError::CheckRange { .. })
    ));
    assert!(matches!(
        d.region_read(8, 0, &mut buf),
        Err(DeviceError::CheckRegion { .. })
    ));
    assert!(matches!(
        d.region_read(4, u64::MAX, &mut buf),
        Err(DeviceError::CheckRange { .. })
    ));
}

#[test]
fn set_irqs_passes_the_clients_eventfds_to_vfio() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    let efd = nix::sys::eventfd::EventFd::new().expect("eventfd");
    let raw = std::os::fd::AsRawFd::as_raw_fd(&efd);
    let owned: OwnedFd = efd.into();
    d.set_irqs(SetIrqsRequest {
        index: 2,
        start: 0,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::Eventfds(vec![owned]),
    })
    .expect("MSI-X");
    d.set_irqs(SetIrqsRequest {
        index: 0,
        start: 0,
        count: 1,
        action: IrqAction::Unmask,
        data: IrqData::None,
    })
    .expect("INTx unmask");
    let bad = d.set_irqs(SetIrqsRequest {
        index: 2,
        start: 1,
        count: 1,
        action: IrqAction::Trigger,
        data: IrqData::None,
    });
    assert!(
        matches!(bad, Err(DeviceError::CheckIrqRange { .. })),
        "{bad:?}"
    );
    assert!(matches!(
        d.set_irqs(SetIrqsRequest {
            index: 9,
            start: 0,
            count: 0,
            action: IrqAction::Trigger,
            data: IrqData::None,
        }),
        Err(DeviceError::CheckIrqIndex { .. })
    ));
    let s = kernel.state.lock().unwrap();
    assert_eq!(
        s.set_irqs,
        vec![
            (
                wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
                2,
                0,
                1,
                raw.to_ne_bytes().to_vec()
            ),
            (
                wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
                0,
                0,
                1,
                vec![]
            ),
        ]
    );
}

#[test]
fn detach_unmaps_everything_disables_irqs_and_resets() {
    let (d, kernel) = open(AUTO, FakeState::default());
    let d = d.expect("device");
    let (a, _f) = dma_region(0x10_0000, 0x2000, RW);
    d.dma_mapped(&a).expect("map");
    d.region_write(7, 0x106, &0x8000u16.to_le_bytes())
        .expect("ATS enable");
    d.detach();
    let s = kernel.state.lock().unwrap();
    assert_eq!(s.unmaps, vec![(0, u64::MAX)]);
    let disabled: Vec<u32> = s
        .set_irqs
        .iter()
        .filter(|(f, _, _, count, _)| {
            *f == VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER && *count == 0
        })
        .map(|(_, index, ..)| *index)
        .collect();
    assert_eq!(
        disabled,
        vec![0, 2, 3, 4],
        "every index with vectors (MSI has none here)"
    );
    assert_eq!(s.resets, 1);
    drop(s);
    let mut back = [0u8; 2];
    d.region_read(7, 0x106, &mut back).expect("read back");
    assert_eq!(u16::from_le_bytes(back), 0, "ATS control reset");
    d.reset().expect("reset");
    assert_eq!(kernel.state.lock().unwrap().resets, 2);
}

/// A fake sysfs/dev tree under a temporary directory.
struct FakeSystem {
    root: PathBuf,
}

impl FakeSystem {
    fn new(tag: &str) -> FakeSystem {
        let root =
            std::env::temp_dir().join(format!("vfud-host-locate-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers/virtio-pci")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        FakeSystem { root }
    }

    fn paths(&self) -> SystemPaths {
        SystemPaths {
            sys: self.root.join("sys"),
            dev: self.root.join("dev"),
        }
    }

    fn device(&self, driver: Option<&str>, vfio_dev: Option<&str>) {
        let dir = self.root.join("sys/bus/pci/devices/0000:01:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(d) = driver {
            std::os::unix::fs::symlink(
                self.root.join("sys/bus/pci/drivers").join(d),
                dir.join("driver"),
            )
            .unwrap();
        }
        if let Some(n) = vfio_dev {
            std::fs::create_dir_all(dir.join("vfio-dev").join(n)).unwrap();
        }
    }
}

impl Drop for FakeSystem {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn host(device: &str) -> vfu_config::HostDevice {
    match config(device).device {
        vfu_config::DeviceSpec::Host(h) => h,
        other => panic!("{other:?}"),
    }
}

#[test]
fn locate_explains_absent_unbound_and_cdev_less_devices() {
    let sys = FakeSystem::new("errors");
    let e = locate("nic0", &host(AUTO), &sys.paths()).expect_err("absent");
    assert!(matches!(e, LocateError::FindDevice { .. }));
    assert!(e.to_string().contains("lspci -D"), "{e}");

    sys.device(Some("virtio-pci"), None);
    let e = locate("nic0", &host(AUTO), &sys.paths())
        .expect_err("wrong driver")
        .to_string();
    assert!(
        e.contains("nic0")
            && e.contains("virtio-pci")
            && e.contains("driver_override")
            && e.contains("driver/unbind"),
        "{e}"
    );
    std::fs::remove_file(sys.root.join("sys/bus/pci/devices/0000:01:00.0/driver")).unwrap();
    let e = locate("nic0", &host(AUTO), &sys.paths())
        .expect_err("no driver")
        .to_string();
    assert!(e.contains("no driver") && !e.contains("unbind"), "{e}");

    std::fs::remove_dir_all(sys.root.join("sys/bus/pci/devices/0000:01:00.0")).unwrap();
    sys.device(Some("vfio-pci"), None);
    let e = locate("nic0", &host(AUTO), &sys.paths())
        .expect_err("no cdev")
        .to_string();
    assert!(e.contains("CONFIG_VFIO_DEVICE_CDEV"), "{e}");
}

#[test]
fn locate_finds_the_cdev_and_open_explains_missing_iommufd() {
    let sys = FakeSystem::new("found");
    sys.device(Some("vfio-pci"), Some("vfio3"));
    let loc = locate("nic0", &host(AUTO), &sys.paths()).expect("found");
    assert_eq!(loc.cdev, sys.root.join("dev/vfio/devices/vfio3"));
    assert_eq!(loc.iommufd, sys.root.join("dev/iommu"));
    assert_eq!(loc.label, "0000:01:00.0");

    // The cdev node exists (a plain file stands in), /dev/iommu does not.
    std::fs::create_dir_all(sys.root.join("dev/vfio/devices")).unwrap();
    std::fs::write(sys.root.join("dev/vfio/devices/vfio3"), b"").unwrap();
    let e = loc.open("nic0").expect_err("no iommufd").to_string();
    assert!(
        e.contains("CONFIG_IOMMUFD") && e.contains("modprobe iommufd"),
        "{e}"
    );

    let by_cdev = locate(
        "nic0",
        &host(r#"{"type": "host", "cdev": "/nonexistent/vfio9", "iommufd": "/nonexistent/iommu"}"#),
        &sys.paths(),
    )
    .expect("cdev is taken as is");
    assert_eq!(by_cdev.cdev, Path::new("/nonexistent/vfio9"));
    let e = by_cdev.open("nic0").expect_err("missing cdev").to_string();
    assert!(
        e.contains("/nonexistent/vfio9") && e.contains("CONFIG_VFIO_DEVICE_CDEV"),
        "{e}"
    );
}

/// The whole server path: a DMA_MAP the kernel cannot pin gets an error reply with ENOMEM,
/// the connection and the daemon live on, and the next map (limit raised) succeeds.
#[test]
fn a_failed_pin_is_an_error_reply_and_the_server_keeps_serving() {
    use crate::server::DeviceServer;
    use vfu_protocol::client::Client;
    use vfu_protocol::negotiate::ServerLimits;

    let kernel = FakeKernel::new(FakeState {
        fail_map_file: Some(Errno::ENOMEM),
        ..Default::default()
    });
    let device = HostPciDevice::with_kernel(
        &config(AUTO),
        "0000:01:00.0",
        Box::new(kernel.clone()),
        &mut Resolver::new(),
    )
    .expect("device");
    let dir = std::env::temp_dir().join(format!("vfud-host-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("nic0.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = runtime
        .block_on(async {
            DeviceServer::bind(
                "nic0",
                &socket,
                std::sync::Arc::new(device),
                ServerLimits::default(),
            )
        })
        .expect("bind");
    let stats = std::sync::Arc::new(crate::server::DeviceStats::new());
    let serving = runtime.spawn(server.serve(stopped, stats));

    let mut c = Client::connect(&socket).expect("connect and negotiate");
    let memfd = memfd_create(c"vfud-host-server", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&memfd, 0x10000).expect("size");
    let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    let e = c
        .dma_map(
            0x10_0000,
            0x10000,
            rw,
            Some((std::os::fd::AsFd::as_fd(&memfd), 0)),
        )
        .expect_err("pinning fails");
    assert_eq!(e.server_errno(), Some(Errno::ENOMEM), "{e}");
    // The map was rolled back: the same range maps once the limit is raised.
    assert_eq!(c.device_info().expect("still serving").num_regions, 9);
    kernel.state.lock().unwrap().fail_map_file = None;
    c.dma_map(
        0x10_0000,
        0x10000,
        rw,
        Some((std::os::fd::AsFd::as_fd(&memfd), 0)),
    )
    .expect("map after the limit was raised");
    assert_eq!(
        kernel.state.lock().unwrap().maps[0].0,
        "file",
        "the server's table kept the client's file for IOMMU_IOAS_MAP_FILE"
    );
    c.dma_unmap(0x10_0000, 0x10000, 0).expect("unmap");
    assert_eq!(
        kernel.state.lock().unwrap().unmaps,
        vec![(0x10_0000, 0x10000)],
        "unmapped from the IOAS before the reply"
    );
    drop(c);
    stop.send(true).expect("stop");
    runtime.block_on(serving).expect("server task");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn open_errors_say_what_to_change() {
    use std::io::{Error, ErrorKind};
    let err = |kind: ErrorKind| LocateError::OpenCdev {
        device: "nic0".into(),
        path: "/dev/vfio/devices/vfio0".into(),
        kind,
        source: Error::from(kind),
    };
    let denied = err(ErrorKind::PermissionDenied).to_string();
    assert!(
        denied.contains("nic0")
            && denied.contains("/dev/vfio/devices/vfio0")
            && denied.contains("udev rule"),
        "{denied}"
    );
    let busy = err(ErrorKind::ResourceBusy).to_string();
    assert!(busy.contains("in use"), "{busy}");
    let (d, _) = open(
        AUTO,
        FakeState {
            fail_bind: Some(Errno::EPERM),
            ..Default::default()
        },
    );
    let text = d.expect_err("unisolated MSI").to_string();
    assert!(
        text.contains("iommufd.allow_unsafe_interrupts=1") && text.contains("interrupt remapping"),
        "{text}"
    );
}

/// A host device behind a VT-d model: `auto` resolves from the kernel's registers, the first
/// device freezes the model, and a later device whose IOMMU cannot honour it is refused.
#[test]
fn viommu_resolves_from_the_kernel_freezes_and_drives_ats() {
    const VTD_AUTO: &str = r#"{"type": "host", "pci": "0000:01:00.0", "viommu": {"model": "vtd"}}"#;
    let without_dt = || FakeState {
        hw_info: Ok(HostHwInfo {
            capabilities: 0,
            max_pasid_log2: 0,
            iommu: HostIommuHwInfo::IntelVtd {
                flags: 0,
                cap_reg: 0x00d2_008c_2226_0206,
                ecap_reg: 0x00f0_0f5e & !(1 << 2),
            },
        }),
        ..Default::default()
    };
    let open_with = |device: &str, state: FakeState, resolver: &mut Resolver| {
        HostPciDevice::with_kernel(
            &config(device),
            "0000:01:00.0",
            Box::new(FakeKernel::new(state)),
            resolver,
        )
    };

    // The first device's IOMMU has device-TLB support (ECAP.DT): the model offers ATS.
    let mut vm = Resolver::new();
    let first = open_with(VTD_AUTO, FakeState::default(), &mut vm).expect("first device");
    assert!(guest_has_ats(&first));
    let (_, frozen) = vm.frozen().expect("frozen at the first device");
    assert!(
        frozen.qemu_argument().contains("device-iotlb=on"),
        "{}",
        frozen.qemu_argument()
    );

    // A second device behind an IOMMU without DT cannot honour the frozen device_iotlb=on.
    let refused = open_with(VTD_AUTO, without_dt(), &mut vm).expect_err("incompatible host");
    assert!(
        matches!(refused, HostDeviceError::ResolveViommu(_)),
        "{refused:?}"
    );
    let text = refused.to_string();
    assert!(text.contains("nic0") && text.contains("frozen"), "{text}");

    // Frozen without DT: the model offers no ATS, so `auto` masks it and `on` refuses.
    let mut vm = Resolver::new();
    let masked = open_with(VTD_AUTO, without_dt(), &mut vm).expect("no DT is no error");
    assert!(!guest_has_ats(&masked));
    let reason = masked.capabilities().expect("decisions").ats.to_string();
    assert!(reason.contains("vIOMMU"), "{reason}");
    let on = r#"{"type": "host", "pci": "0000:01:00.0", "ats": "on", "viommu": {"model": "vtd"}}"#;
    let refused = open_with(on, without_dt(), &mut Resolver::new()).expect_err("ats=on");
    assert!(
        matches!(refused, HostDeviceError::ApplyPolicy(_)),
        "{refused:?}"
    );
}

#[test]
fn a_host_devices_viommu_block_takes_no_host_registers() {
    let e = vfu_config::parse_str(
        r#"{"version": 1, "name": "nic0", "socket": "/s", "device": {"type": "host", "pci": "0000:01:00.0", "viommu": {"model": "vtd", "host": {"cap": 0, "ecap": 0}}}}"#,
        None,
    )
    .expect_err("host registers on a host device");
    let text = e.to_string();
    assert!(
        text.contains("device.viommu.host") && text.contains("kernel"),
        "{text}"
    );
}
