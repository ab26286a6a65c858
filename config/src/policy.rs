//! The capability policy settings of a device: `on | off | auto` per managed PCIe capability,
//! compatibility levels that pin older defaults, and the description of the IOMMU an emulated
//! device sits behind.
//!
//! These types only carry what the operator wrote. Deciding what the guest sees (which needs the
//! device's own capabilities and what the host IOMMU reports) is the daemon's job.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Largest PASID width PCI Express allows, in bits.
pub const MAX_PASID_WIDTH: u8 = 20;

/// How one PCIe capability (ATS, PASID or PRI) is presented to the guest.
///
/// Spelled `"on"`, `"off"` or `"auto"` in JSON, after QEMU's `OnOffAuto` properties.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapabilityPolicy {
    /// Required: the device refuses to start if the capability cannot be exposed. Never
    /// silently degraded, so a guest that depends on it never runs without it.
    On,
    /// Always hidden from the guest.
    Off,
    /// Exposed when the device has it and the IOMMU does not report it unusable.
    Auto,
}

impl CapabilityPolicy {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CapabilityPolicy::On => "on",
            CapabilityPolicy::Off => "off",
            CapabilityPolicy::Auto => "auto",
        }
    }
}

impl fmt::Display for CapabilityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compatibility level: the capability defaults of one vfud release, like a QEMU machine
/// type. A configuration that names a level keeps that release's guest-visible behaviour
/// across upgrades; explicit `ats`/`pasid`/`pri` values still win over the level's defaults.
///
/// Spelled as a string in JSON (`"compat": "0"`); an integer is accepted too. Levels are
/// only ever added, never changed, so a pinned level means the same thing forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompatLevel {
    /// `"0"`: capabilities pass through as the device reports them, as before the policy
    /// existed: `ats=on`, `pri=on`, `pasid=off`.
    Level0,
    /// `"1"`, the current level: `ats`, `pasid` and `pri` are `auto`.
    #[default]
    Level1,
}

impl CompatLevel {
    /// The level a configuration without `compat` gets.
    pub const CURRENT: CompatLevel = CompatLevel::Level1;

    /// Every level, oldest first.
    pub const ALL: [CompatLevel; 2] = [CompatLevel::Level0, CompatLevel::Level1];

    /// The JSON spelling of the level.
    pub fn as_str(self) -> &'static str {
        match self {
            CompatLevel::Level0 => "0",
            CompatLevel::Level1 => "1",
        }
    }

    /// The level's defaults for `ats`, `pasid` and `pri`, in that order.
    pub fn defaults(self) -> [CapabilityPolicy; 3] {
        use CapabilityPolicy::{Auto, Off, On};
        match self {
            CompatLevel::Level0 => [On, Off, On],
            CompatLevel::Level1 => [Auto, Auto, Auto],
        }
    }

    /// Whether this is [`CompatLevel::CURRENT`] (used to leave it out when serializing).
    pub fn is_current(&self) -> bool {
        *self == CompatLevel::CURRENT
    }

    /// Merges explicit settings over this level's defaults, remembering where each value
    /// came from so that messages can say "the default of compat level 0".
    pub fn resolve(
        self,
        ats: Option<CapabilityPolicy>,
        pasid: Option<CapabilityPolicy>,
        pri: Option<CapabilityPolicy>,
    ) -> CapabilityPolicies {
        let [d_ats, d_pasid, d_pri] = self.defaults();
        let pick = |explicit: Option<CapabilityPolicy>, default| match explicit {
            Some(value) => PolicySetting {
                value,
                origin: PolicyOrigin::Explicit,
            },
            None => PolicySetting {
                value: default,
                origin: PolicyOrigin::Compat(self),
            },
        };
        CapabilityPolicies {
            ats: pick(ats, d_ats),
            pasid: pick(pasid, d_pasid),
            pri: pick(pri, d_pri),
        }
    }

    fn from_name(name: &str) -> Option<CompatLevel> {
        CompatLevel::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

impl fmt::Display for CompatLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CompatLevel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The known levels with what they mean, for error messages.
const KNOWN_LEVELS: &str = "known levels are \"0\" (ats=on, pri=on, pasid=off: capabilities pass through as the device reports them) and \"1\" (the current level: ats, pasid and pri auto)";

impl<'de> Deserialize<'de> for CompatLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LevelVisitor;
        impl Visitor<'_> for LevelVisitor {
            type Value = CompatLevel;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a compat level such as \"0\" or \"1\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<CompatLevel, E> {
                CompatLevel::from_name(v).ok_or_else(|| {
                    E::custom(format!(
                        "unknown compat level {}; {}",
                        serde_json::Value::String(v.to_owned()),
                        KNOWN_LEVELS
                    ))
                })
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CompatLevel, E> {
                CompatLevel::from_name(&v.to_string())
                    .ok_or_else(|| E::custom(format!("unknown compat level {v}; {}", KNOWN_LEVELS)))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CompatLevel, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "unknown compat level {v}; {}",
                        KNOWN_LEVELS
                    ))),
                }
            }
        }
        deserializer.deserialize_any(LevelVisitor)
    }
}

/// Where an effective policy value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyOrigin {
    /// Written in the configuration.
    Explicit,
    /// The default of this compat level (the configured one, or the current level).
    Compat(CompatLevel),
}

/// An effective policy value with its origin.
///
/// The origin matters for `on`: an explicit `on` demands the capability, while the `on` of a
/// pass-through compat level (`"0"`) only exposes what the device has, and refuses to start
/// only where the old release would have exposed an unusable capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicySetting {
    /// The policy in force.
    pub value: CapabilityPolicy,
    /// Where it came from.
    pub origin: PolicyOrigin,
}

impl PolicySetting {
    /// An explicitly configured value.
    pub fn explicit(value: CapabilityPolicy) -> PolicySetting {
        PolicySetting {
            value,
            origin: PolicyOrigin::Explicit,
        }
    }
}

impl fmt::Display for PolicySetting {
    /// `on`, or `on (the default of compat level 0)` for a value from a pinned old level.
    /// The current level's defaults are shown bare: they are what a reader expects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.origin {
            PolicyOrigin::Compat(level) if !level.is_current() => {
                write!(f, "{} (the default of compat level {level})", self.value)
            }
            _ => write!(f, "{}", self.value),
        }
    }
}

/// The effective policy of each managed capability after merging the compat level's defaults
/// with explicit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapabilityPolicies {
    /// Address Translation Services (extended capability 0x000f).
    pub ats: PolicySetting,
    /// Process Address Space ID (extended capability 0x001b).
    pub pasid: PolicySetting,
    /// Page Request Interface (extended capability 0x0013).
    pub pri: PolicySetting,
}

impl CapabilityPolicies {
    /// Policies set explicitly in the configuration, not taken from a compat level.
    pub fn explicit(
        ats: CapabilityPolicy,
        pasid: CapabilityPolicy,
        pri: CapabilityPolicy,
    ) -> CapabilityPolicies {
        CapabilityPolicies {
            ats: PolicySetting::explicit(ats),
            pasid: PolicySetting::explicit(pasid),
            pri: PolicySetting::explicit(pri),
        }
    }
}

impl Default for CapabilityPolicies {
    fn default() -> Self {
        CompatLevel::CURRENT.resolve(None, None, None)
    }
}

fn yes() -> bool {
    true
}

fn default_pasid_width() -> u8 {
    MAX_PASID_WIDTH
}

/// What the IOMMU an emulated device sits behind supports, mirroring what Linux reports for a
/// host device in `IOMMU_GET_HW_INFO` (so `auto` resolves the same way for both kinds).
///
/// Every field defaults to "supported", and so does a missing `iommu` block.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuSpec {
    /// ATS may be enabled for the device; `false` is `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED`.
    #[serde(default = "yes")]
    pub ats_supported: bool,
    /// Supported PASID width in bits, 0 (no PASID) to [`MAX_PASID_WIDTH`]; the host's
    /// `out_max_pasid_log2`.
    #[serde(default = "default_pasid_width")]
    pub max_pasid_log2: u8,
    /// Execute-permission requests with PASID are supported (`IOMMU_HW_CAP_PCI_PASID_EXEC`).
    #[serde(default = "yes")]
    pub pasid_exec: bool,
    /// Privileged-mode requests with PASID are supported (`IOMMU_HW_CAP_PCI_PASID_PRIV`).
    #[serde(default = "yes")]
    pub pasid_priv: bool,
}

impl Default for IommuSpec {
    fn default() -> Self {
        IommuSpec {
            ats_supported: true,
            max_pasid_log2: MAX_PASID_WIDTH,
            pasid_exec: true,
            pasid_priv: true,
        }
    }
}

/// Lowest offset of an extended capability.
pub const EXT_CAP_MIN_OFFSET: u16 = 0x100;
/// Highest offset at which an 8-byte capability still fits in 4 KiB of config space.
pub const PASID_CAP_MAX_OFFSET: u16 = 0xff8;

/// Where to place a PASID capability that vfud synthesizes: a 4-byte-aligned offset in
/// `0x100..=0xff8`, so the 8-byte capability fits in the extended config space.
///
/// Written in JSON as an integer or a string in hexadecimal (`"0xff8"`) or decimal; serialized
/// as a hexadecimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PasidCapOffset(u16);

impl PasidCapOffset {
    /// Checks the placement rules; the error says what is wrong and what would be valid.
    pub fn new(offset: u64) -> Result<PasidCapOffset, String> {
        let range = format!(
            "use a 4-byte-aligned offset from {EXT_CAP_MIN_OFFSET:#x} to {PASID_CAP_MAX_OFFSET:#x}, e.g. \"{PASID_CAP_MAX_OFFSET:#x}\""
        );
        if offset < u64::from(EXT_CAP_MIN_OFFSET) {
            return Err(format!(
                "the offset {offset:#x} is below the extended config space; {range}"
            ));
        }
        if offset > u64::from(PASID_CAP_MAX_OFFSET) {
            return Err(format!(
                "the offset {offset:#x} leaves no room for the 8-byte PASID capability in 4 KiB of config space; {range}"
            ));
        }
        if offset % 4 != 0 {
            return Err(format!(
                "the offset {offset:#x} is not 4-byte aligned; {range}"
            ));
        }
        // In range: at most 0xff8.
        Ok(PasidCapOffset(offset as u16))
    }

    /// The offset in config space.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for PasidCapOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Serialize for PasidCapOffset {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PasidCapOffset {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OffsetVisitor;
        impl Visitor<'_> for OffsetVisitor {
            type Value = PasidCapOffset;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a config-space offset such as \"0xff8\" or 4088")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PasidCapOffset, E> {
                PasidCapOffset::new(v).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PasidCapOffset, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "the offset {v} is negative; use a 4-byte-aligned offset from {EXT_CAP_MIN_OFFSET:#x} to {PASID_CAP_MAX_OFFSET:#x}"
                    ))),
                }
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PasidCapOffset, E> {
                let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                match parsed {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "{} is not an offset; write it as \"0xff8\" (hexadecimal) or 4088",
                        serde_json::Value::String(v.to_owned())
                    ))),
                }
            }
        }
        deserializer.deserialize_any(OffsetVisitor)
    }
}
