#!/usr/bin/env python3
"""Writes the committed seed corpus of each fuzz target (seeds/<target>/). Run from anywhere;
the seeds are plain inputs in the formats documented in vfud_tests::fuzz."""
import json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))

def out(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# --- message_stream: records [chunk length - 1][fd count][chunk] ------------------------------
def msg(mid, cmd, payload, flags=0):
    return struct.pack("<HHIII", mid, cmd, 16 + len(payload), flags, 0) + payload

def records(stream, fds_at=()):
    r, i, n = b"", 0, 0
    while i < len(stream):
        chunk = stream[i:i + 256]
        r += bytes([len(chunk) - 1, 1 if n in fds_at else 0]) + chunk
        i += len(chunk); n += 1
    return r

caps = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576,
                                    "max_dma_maps": 65535, "pgsizes": 4096,
                                    "write_multiple": True}}).encode() + b"\0"
version = msg(0, 1, struct.pack("<HH", 0, 2) + caps)
ops = [
    msg(1, 4, struct.pack("<IIII", 16, 0, 0, 0)),                        # DEVICE_GET_INFO
    msg(2, 5, struct.pack("<IIIIQQ", 32, 0, 0, 0, 0, 0)),                # REGION_INFO 0
    msg(3, 7, struct.pack("<IIII", 16, 0, 2, 0)),                        # IRQ_INFO MSI-X
    msg(4, 9, struct.pack("<QII", 0, 7, 4)),                             # REGION_READ config
    msg(5, 10, struct.pack("<QII", 0x10, 0, 4) + b"\x01\x02\x03\x04"),   # REGION_WRITE BAR0
    msg(6, 2, struct.pack("<IIQQQ", 32, 3, 0, 0x10000, 0x1000)),         # DMA_MAP (1 fd)
    msg(7, 3, struct.pack("<IIQQ", 24, 0, 0x10000, 0x1000)),             # DMA_UNMAP
    msg(8, 8, struct.pack("<IIIII", 20, 0x21, 2, 0, 1)),                 # SET_IRQS trigger
    msg(9, 15, struct.pack("<Q", 1) + struct.pack("<QII", 0x10, 0, 4) + b"\xaa" * 8),
    msg(10, 13, b""),                                                     # DEVICE_RESET
    msg(11, 16, struct.pack("<II", 8, 0)),                               # DEVICE_FEATURE
    msg(12, 11, struct.pack("<QQ", 0, 4), flags=1),                      # a reply from the client
]
out("message_stream", "version-only", records(version))
out("message_stream", "session", records(version + b"".join(ops), fds_at=(5,)))
out("message_stream", "oversized", records(version + struct.pack("<HHIII", 1, 9, 0x7fffffff, 0, 0)))
out("message_stream", "undersized", records(version + struct.pack("<HHIII", 1, 9, 8, 0, 0)))

# --- config_space: [policies][host caps][size][config space][accesses] -------------------------
def ext(cap_id, version, nxt):
    return struct.pack("<I", cap_id | version << 16 | nxt << 20)

cs = bytearray(4096)
cs[0:4] = struct.pack("<HH", 0x1b36, 0x0042)
cs[6:8] = struct.pack("<H", 0x0010)              # status: capability list
cs[0x0e] = 0x00
cs[0x34] = 0x40
cs[0x40:0x44] = bytes([0x01, 0x50, 0x03, 0x00])  # power management -> 0x50
cs[0x50:0x54] = bytes([0x11, 0x60, 0x03, 0x00])  # MSI-X (4 vectors) -> 0x60
cs[0x54:0x5c] = struct.pack("<II", 0x2000, 0x3000)
cs[0x60:0x64] = bytes([0x10, 0x00, 0x02, 0x00])  # PCI Express, end of the standard chain
cs[0x100:0x104] = ext(0x000F, 1, 0x110)          # ATS
cs[0x110:0x114] = ext(0x0013, 1, 0x120)          # PRI
cs[0x114:0x118] = struct.pack("<HH", 0, 0x0100)
cs[0x118:0x11c] = struct.pack("<I", 32)
cs[0x120:0x124] = ext(0x001B, 1, 0)              # PASID
cs[0x124:0x126] = struct.pack("<H", 0x1406)
accesses = (struct.pack("<HBB", 0x104, 2, 1) + b"\x00\x80"    # ATS Control Enable
            + struct.pack("<HBB", 0x126, 2, 1) + b"\x01\x00"  # PASID Enable
            + struct.pack("<HBB", 0x114, 2, 1) + b"\x03\x00"  # PRI Enable + Reset
            + struct.pack("<HBB", 0x100, 4, 0) + struct.pack("<HBB", 0x004, 2, 0))
for p in (0, 1, 2, 40, 0x80):                     # auto/on/off mixes, hidden PASID
    out("config_space", f"pcie-ats-pri-pasid-p{p}", bytes([p, 0xff, 1]) + bytes(cs) + accesses)
out("config_space", "pcie-no-host-ats", bytes([0, 0x00, 1]) + bytes(cs) + accesses)
conv = bytearray(cs[:256]); conv[0x34] = 0x40
out("config_space", "conventional", bytes([0, 0xff, 0]) + bytes(conv) + accesses[:8])

# --- config_json ----------------------------------------------------------------------------
def cfg(device, **extra):
    c = {"version": 1, "name": "dev0", "socket": "/run/vfud/dev0.sock", "device": device}
    c.update(extra)
    return json.dumps(c, indent=1).encode()

out("config_json", "default", cfg({"type": "emulated", "model": "ats-dma"}))
out("config_json", "policies", cfg({"type": "emulated", "model": "ats-dma", "ats": "on",
                                     "pasid": "auto", "pri": "off", "compat": "0"}))
out("config_json", "iommu-block", cfg({"type": "emulated", "model": "ats-dma",
                                        "iommu": {"ats_supported": False, "max_pasid_log2": 0}}))
out("config_json", "pasid-placement", cfg({"type": "emulated", "model": "ats-dma",
                                            "pasid_cap_hidden": True, "pasid_cap_offset": 0x200}))
out("config_json", "host", cfg({"type": "host", "pci": "0000:01:00.0", "iommufd": "/dev/iommu"}))

# --- viommu_vtd / viommu_smmuv3: [props a][props b][fill/256][memory][ops] -----------------
def op_write(off, value, wide=True):
    return bytes([0, 2 if wide else 0]) + struct.pack("<HQ", off, value)

def op_dma(sid, addr, write=False, pasid=None):
    flags = (1 if pasid is not None else 0) | (4 if write else 0)
    p = struct.pack("<I", pasid)[:3] if pasid is not None else b""
    return bytes([2, flags]) + p + struct.pack("<HQ", sid, addr)

def op_ats(sid, addr, length, pasid=None):
    p = struct.pack("<I", pasid)[:3] if pasid is not None else b""
    return bytes([3, 1 if pasid is not None else 0]) + p + struct.pack("<HQ", sid, addr) + struct.pack("<I", length)[:3]

# Root table at 0x1000, invalidation queue at 0x8000, then the driver's enable order.
vtd_ops = (op_write(0x20, 0x1000 | (1 << 11)) + op_write(0x18, 1 << 30, False)
           + op_write(0x90, 0x8000 | (1 << 11)) + op_write(0x18, (1 << 30) | (1 << 26), False)
           + op_write(0x88, 0x20) + bytes([6, 0])
           + op_write(0x18, (1 << 31) | (1 << 26), False)
           + op_dma(0x0008, 0x2000) + op_ats(0x0008, 0x2000, 0x1000, pasid=5) + bytes([4, 0, 5, 0]))
out("viommu_vtd", "linux-order", bytes([0xfe, 0xf4, 0]) + vtd_ops)
out("viommu_vtd", "legacy", bytes([0x11, 0x00, 0]) + vtd_ops)

# Linear stream table at 0x1000 (log2size 4), command queue at 0x4000 (log2size 5), SMMUEN.
smmu_ops = (op_write(0x80, 0x1000) + op_write(0x88, 4, False) + op_write(0x90, 0x4000 | 5)
            + op_write(0x20, 0x8, False) + op_write(0x98, 1, False) + bytes([6, 0])
            + op_write(0x20, 0x9, False)
            + op_dma(1, 0x2000) + op_ats(1, 0x2000, 0x1000, pasid=5) + bytes([4, 0, 5, 0]))
out("viommu_smmuv3", "linux-order", bytes([0x0f, 0x14, 0]) + smmu_ops)
out("viommu_smmuv3", "stage2-only", bytes([0x02, 0x00, 0]) + smmu_ops)
