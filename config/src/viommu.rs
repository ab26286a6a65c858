//! The `viommu` block: which vIOMMU model a VM puts in front of the device, its properties
//! (`"auto"` resolves them from the host IOMMU), and for an emulated device the raw host IOMMU
//! registers that `auto` resolves from (a host device gets them from `IOMMU_GET_HW_INFO`).
//!
//! ```json
//! "viommu": {"model": "smmuv3", "ats": "auto", "ril": "auto", "ssidsize": "auto", "oas": "auto",
//!            "host": {"idr": ["0x0c8e2fcb", "0x0e7c2d5b", "0x0", "0x404", "0x0", "0x75"]}}
//! "viommu": {"model": "vtd", "device_iotlb": "auto", "pasid_bits": "auto", "fs1gp": "auto",
//!            "host": {"cap": "0x19ed008c40780c66", "ecap": "0x29ca7f0f5af"}}
//! ```

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Widest SMMUv3 SubstreamID / VT-d PASID a model may advertise, in bits.
pub const MAX_VIOMMU_PASID_BITS: u8 = 20;
/// Output address sizes QEMU's `arm-smmuv3` accepts, in bits.
pub const SMMUV3_OAS_BITS: [u8; 2] = [44, 48];

/// A property that is either given or resolved from the host (`"auto"`, the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Auto<T> {
    /// Resolve from the host IOMMU at the first device.
    #[default]
    Auto,
    /// This value; the host must be able to honour it.
    Value(T),
}

impl<T: Serialize> Serialize for Auto<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Auto::Auto => serializer.serialize_str("auto"),
            Auto::Value(v) => v.serialize(serializer),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Auto<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.as_str() == Some("auto") {
            return Ok(Auto::Auto);
        }
        T::deserialize(value)
            .map(Auto::Value)
            .map_err(|e| de::Error::custom(format!("expected \"auto\" or a value: {e}")))
    }
}

/// A raw 32- or 64-bit register value, written as an integer or a hexadecimal string
/// (`"0x..."`), since JSON tools lose precision on 64-bit numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RawRegister(pub u64);

impl Serialize for RawRegister {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for RawRegister {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RegisterVisitor;
        impl Visitor<'_> for RegisterVisitor {
            type Value = RawRegister;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a register value such as \"0x19ed008c40780c66\" or 4096")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawRegister, E> {
                Ok(RawRegister(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawRegister, E> {
                let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                    None => v.parse(),
                };
                parsed.map(RawRegister).map_err(|_| {
                    E::custom(format!(
                        "{} is not a register value; write it as \"0x1f\" (hexadecimal) or 31",
                        serde_json::Value::String(v.to_owned())
                    ))
                })
            }
        }
        deserializer.deserialize_any(RegisterVisitor)
    }
}

/// The host SMMUv3's ID registers IDR0..IDR5, as `IOMMU_GET_HW_INFO` reports them
/// (`struct iommu_hw_info_arm_smmuv3`).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smmuv3HostRegisters {
    /// IDR0 to IDR5, 32 bits each.
    pub idr: [RawRegister; 6],
}

/// The host VT-d unit's capability registers, as `IOMMU_GET_HW_INFO` reports them
/// (`struct iommu_hw_info_vtd`).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VtdHostRegisters {
    /// CAP_REG.
    pub cap: RawRegister,
    /// ECAP_REG.
    pub ecap: RawRegister,
}

/// The vIOMMU model a VM puts in front of the device, selected by `"model"`.
///
/// Every device of one VM names the same block; the first device in file order resolves
/// `auto` from its host and freezes the result (`vfud resolve`).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ViommuSpec {
    /// Arm SMMUv3 (QEMU `-device arm-smmuv3,accel=on`).
    Smmuv3 {
        /// IDR0.ATS: devices may use ATS (per device: the host must allow it).
        #[serde(default)]
        ats: Auto<bool>,
        /// IDR3.RIL: range invalidations.
        #[serde(default)]
        ril: Auto<bool>,
        /// IDR1.SSIDSIZE: SubstreamID (PASID) bits, 0 to 20.
        #[serde(default)]
        ssidsize: Auto<u8>,
        /// IDR5.OAS: output address size in bits, 44 or 48.
        #[serde(default)]
        oas: Auto<u8>,
        /// The host IOMMU's registers, for an emulated device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<Smmuv3HostRegisters>,
    },
    /// Intel VT-d (QEMU `-device intel-iommu`).
    Vtd {
        /// ECAP.DT: device-TLB (ATS).
        #[serde(default)]
        device_iotlb: Auto<bool>,
        /// ECAP.PSS + 1: PASID bits, 0 to 20.
        #[serde(default)]
        pasid_bits: Auto<u8>,
        /// CAP.FS1GP: 1 GiB first-stage pages.
        #[serde(default)]
        fs1gp: Auto<bool>,
        /// The host IOMMU's registers, for an emulated device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<VtdHostRegisters>,
    },
}

impl ViommuSpec {
    /// The properties without the host registers: what every device of a VM must agree on.
    pub fn model_properties(&self) -> ViommuSpec {
        match *self {
            ViommuSpec::Smmuv3 {
                ats,
                ril,
                ssidsize,
                oas,
                ..
            } => ViommuSpec::Smmuv3 {
                ats,
                ril,
                ssidsize,
                oas,
                host: None,
            },
            ViommuSpec::Vtd {
                device_iotlb,
                pasid_bits,
                fs1gp,
                ..
            } => ViommuSpec::Vtd {
                device_iotlb,
                pasid_bits,
                fs1gp,
                host: None,
            },
        }
    }

    /// Whether the block gives host IOMMU registers (`host`), which only an emulated device's
    /// configuration may.
    pub fn has_host_registers(&self) -> bool {
        match self {
            ViommuSpec::Smmuv3 { host, .. } => host.is_some(),
            ViommuSpec::Vtd { host, .. } => host.is_some(),
        }
    }

    /// Range problems serde cannot express, as (JSON path in a device file, reason).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let width = |path, v: Auto<u8>, out: &mut Vec<(&'static str, String)>| {
            if let Auto::Value(bits) = v {
                if bits > MAX_VIOMMU_PASID_BITS {
                    out.push((
                        path,
                        format!("{bits} bits is more than the {MAX_VIOMMU_PASID_BITS} a PASID has; use 0 to {MAX_VIOMMU_PASID_BITS} or \"auto\""),
                    ));
                }
            }
        };
        match *self {
            ViommuSpec::Smmuv3 { ssidsize, oas, .. } => {
                width("device.viommu.ssidsize", ssidsize, &mut out);
                if let Auto::Value(bits) = oas {
                    if !SMMUV3_OAS_BITS.contains(&bits) {
                        out.push((
                            "device.viommu.oas",
                            format!("QEMU's arm-smmuv3 takes an output address size of 44 or 48 bits, not {bits}; use 44, 48 or \"auto\""),
                        ));
                    }
                }
            }
            ViommuSpec::Vtd { pasid_bits, .. } => {
                width("device.viommu.pasid_bits", pasid_bits, &mut out)
            }
        }
        out
    }
}

/// What an emulated device's `"viommu"` field holds.
///
/// * An object (`{"model": "vtd", ...}`): the vIOMMU a VMM puts in front of the device; vfud
///   only resolves its properties (capability policy, `vfud resolve`) and translates from the
///   client's DMA maps (shadow mode).
/// * A string: the name of a device of `"type": "viommu"` served by the same daemon; the
///   device sits behind that embedded model with the requester id in `"requester_id"`, and its
///   ATS requests and DMA go through the model.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum ViommuAttachment {
    /// A vIOMMU model block.
    Model(ViommuSpec),
    /// The name of a `"type": "viommu"` device.
    Device(String),
}

impl ViommuAttachment {
    /// The model block, if the field holds one.
    pub fn spec(&self) -> Option<&ViommuSpec> {
        match self {
            ViommuAttachment::Model(spec) => Some(spec),
            ViommuAttachment::Device(_) => None,
        }
    }

    /// The named vIOMMU device, if the field holds a name.
    pub fn device(&self) -> Option<&str> {
        match self {
            ViommuAttachment::Model(_) => None,
            ViommuAttachment::Device(name) => Some(name),
        }
    }
}

impl<'de> Deserialize<'de> for ViommuAttachment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttachmentVisitor;
        impl<'de> Visitor<'de> for AttachmentVisitor {
            type Value = ViommuAttachment;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a vIOMMU block such as {\"model\": \"vtd\"} or the name of a device of \"type\": \"viommu\"",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ViommuAttachment, E> {
                Ok(ViommuAttachment::Device(v.to_owned()))
            }

            fn visit_map<A: de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ViommuAttachment, A::Error> {
                ViommuSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ViommuAttachment::Model)
            }
        }
        deserializer.deserialize_any(AttachmentVisitor)
    }
}

/// A PCI requester id (bus, device, function) on segment 0: written `"00:03.0"`,
/// `"0000:00:03.0"` or as the 16-bit integer `bus << 8 | device << 3 | function`. The
/// embedded VT-d model uses it as the source id; the SMMUv3 model as the StreamID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequesterIdSpec(pub u16);

impl RequesterIdSpec {
    /// Parses `[0000:]BB:DD.F` (hexadecimal bus and device, device < 0x20, function < 8).
    pub fn parse(text: &str) -> Result<RequesterIdSpec, String> {
        let bad = || {
            format!(
                "{} is not a requester id; write it as \"00:03.0\" (bus:device.function in hexadecimal, segment 0) or as an integer 0 to 65535",
                serde_json::Value::String(text.to_owned())
            )
        };
        let rest = match text.split_once(':') {
            Some((segment, rest)) if rest.contains(':') => {
                if u16::from_str_radix(segment, 16).map_err(|_| bad())? != 0 {
                    return Err(format!(
                        "{} is on PCI segment {segment}; the embedded vIOMMU models have one segment, use segment 0000",
                        serde_json::Value::String(text.to_owned())
                    ));
                }
                rest
            }
            _ => text,
        };
        let (bus, devfn) = rest.split_once(':').ok_or_else(bad)?;
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
        let dev = u8::from_str_radix(dev, 16).map_err(|_| bad())?;
        let func = func.parse::<u8>().map_err(|_| bad())?;
        if dev >= 0x20 || func >= 8 {
            return Err(bad());
        }
        Ok(RequesterIdSpec(
            u16::from(bus) << 8 | u16::from(dev) << 3 | u16::from(func),
        ))
    }
}

impl fmt::Display for RequesterIdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(f, "{:02x}:{:02x}.{}", v >> 8, (v >> 3) & 0x1f, v & 7)
    }
}

impl Serialize for RequesterIdSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for RequesterIdSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RidVisitor;
        impl Visitor<'_> for RidVisitor {
            type Value = RequesterIdSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a requester id such as \"00:03.0\" or an integer 0 to 65535")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RequesterIdSpec, E> {
                u16::try_from(v).map(RequesterIdSpec).map_err(|_| {
                    E::custom(format!(
                        "{v} is not a requester id; it is 16 bits (0 to 65535)"
                    ))
                })
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RequesterIdSpec, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} is not a requester id; it is 0 to 65535")))
                    .and_then(|v| self.visit_u64(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RequesterIdSpec, E> {
                RequesterIdSpec::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(RidVisitor)
    }
}
