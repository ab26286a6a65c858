//! VERSION negotiation: the JSON capabilities each side sends and what both end up using.
//!
//! Unknown keys are ignored (peers send non-standard ones, e.g. `max_fds`), a known key with the
//! wrong type is an error, and absent keys take the defaults of the specification.

use serde_json::{Map, Value};

/// Protocol major version; the only one that exists.
pub const MAJOR: u16 = 0;
/// Highest minor version we speak.
pub const MINOR: u16 = 2;

/// Default `max_msg_fds` when the peer does not send one.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_data_xfer_size` when the peer does not send one.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default `max_dma_maps` when the peer does not send one.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes` when the peer does not send one.
pub const DEFAULT_PGSIZES: u64 = 4096;

/// Upper bound we accept for a peer's `max_msg_fds` (QEMU's own limit is 16; libvfio-user's 1024).
pub const MAX_MAX_MSG_FDS: u32 = 1024;
/// Upper bound we accept for a peer's `max_data_xfer_size` (QEMU's limit).
pub const MAX_MAX_DATA_XFER_SIZE: u32 = 64 << 20;

/// Why a VERSION payload could not be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NegotiateError {
    #[error("the VERSION payload is shorter than its 4-byte version prefix")]
    ParsePrefix,
    #[error("major version {0} is not supported (only 0 is)")]
    CheckMajor(u16),
    #[error("the capabilities string is not NUL-terminated")]
    ParseTerminator,
    #[error("the capabilities string is not valid UTF-8 JSON: {0}")]
    ParseJson(String),
    #[error("capability `{key}` is invalid: expected {expected}")]
    CheckCapability {
        key: &'static str,
        expected: &'static str,
    },
}

/// `twin_socket` capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TwinSocket {
    pub supported: bool,
    pub fd_index: Option<u32>,
}

/// `migration` capability (de-facto, sent by QEMU and libvfio-user).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationCaps {
    pub pgsize: u64,
    pub max_bitmap_size: Option<u64>,
}

/// The capabilities one side announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the announcing side can receive in one message.
    pub max_msg_fds: u32,
    /// Largest data count in REGION_READ/WRITE and DMA_READ/WRITE the announcing side accepts.
    pub max_data_xfer_size: u32,
    pub max_dma_maps: u32,
    pub pgsizes: u64,
    pub migration: Option<MigrationCaps>,
    pub write_multiple: bool,
    pub twin_socket: Option<TwinSocket>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            migration: None,
            write_multiple: false,
            twin_socket: None,
        }
    }
}

fn get_u64(caps: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, NegotiateError> {
    match caps.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(NegotiateError::CheckCapability {
            key,
            expected: "a non-negative integer",
        }),
    }
}

fn get_u32(
    caps: &Map<String, Value>,
    key: &'static str,
    max: u32,
) -> Result<Option<u32>, NegotiateError> {
    match get_u64(caps, key)? {
        None => Ok(None),
        Some(v) if v <= u64::from(max) => Ok(Some(v as u32)),
        Some(_) => Err(NegotiateError::CheckCapability {
            key,
            expected: "an integer within the protocol's limit",
        }),
    }
}

impl Capabilities {
    /// Parses the JSON text (without its NUL). An empty string means "all defaults", as the
    /// SPDK client sends no JSON at all.
    pub fn from_json(text: &str) -> Result<Capabilities, NegotiateError> {
        let mut out = Capabilities::default();
        if text.is_empty() {
            return Ok(out);
        }
        let root: Value =
            serde_json::from_str(text).map_err(|e| NegotiateError::ParseJson(e.to_string()))?;
        let root = root.as_object().ok_or(NegotiateError::CheckCapability {
            key: "$",
            expected: "a JSON object",
        })?;
        let caps = match root.get("capabilities") {
            None => return Ok(out),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(NegotiateError::CheckCapability {
                    key: "capabilities",
                    expected: "an object",
                })
            }
        };
        if let Some(v) = get_u32(caps, "max_msg_fds", MAX_MAX_MSG_FDS)? {
            out.max_msg_fds = v;
        }
        if let Some(v) = get_u32(caps, "max_data_xfer_size", MAX_MAX_DATA_XFER_SIZE)? {
            out.max_data_xfer_size = v;
        }
        if let Some(v) = get_u32(caps, "max_dma_maps", u32::MAX)? {
            out.max_dma_maps = v;
        }
        if let Some(v) = get_u64(caps, "pgsizes")? {
            out.pgsizes = v;
        }
        out.write_multiple = match caps.get("write_multiple") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(NegotiateError::CheckCapability {
                    key: "write_multiple",
                    expected: "a boolean",
                })
            }
        };
        out.migration = match caps.get("migration") {
            None => None,
            Some(Value::Object(m)) => Some(MigrationCaps {
                pgsize: get_u64(m, "pgsize")?.unwrap_or(DEFAULT_PGSIZES),
                max_bitmap_size: get_u64(m, "max_bitmap_size")?,
            }),
            Some(_) => {
                return Err(NegotiateError::CheckCapability {
                    key: "migration",
                    expected: "an object",
                })
            }
        };
        out.twin_socket = match caps.get("twin_socket") {
            None => None,
            Some(Value::Object(m)) => Some(TwinSocket {
                supported: match m.get("supported") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(NegotiateError::CheckCapability {
                            key: "twin_socket.supported",
                            expected: "a boolean",
                        })
                    }
                },
                fd_index: get_u32(m, "fd_index", MAX_MAX_MSG_FDS)?,
            }),
            Some(_) => {
                return Err(NegotiateError::CheckCapability {
                    key: "twin_socket",
                    expected: "an object",
                })
            }
        };
        Ok(out)
    }

    /// Compact JSON (no spaces). Keys equal to the defaults that a peer may not know are left out
    /// so that the reply stays small: QEMU refuses a VERSION reply larger than its own request.
    pub fn to_json(&self) -> String {
        let mut caps = Map::new();
        caps.insert("max_msg_fds".into(), self.max_msg_fds.into());
        caps.insert("max_data_xfer_size".into(), self.max_data_xfer_size.into());
        caps.insert("max_dma_maps".into(), self.max_dma_maps.into());
        caps.insert("pgsizes".into(), self.pgsizes.into());
        if let Some(m) = self.migration {
            let mut mig = Map::new();
            mig.insert("pgsize".into(), m.pgsize.into());
            if let Some(b) = m.max_bitmap_size {
                mig.insert("max_bitmap_size".into(), b.into());
            }
            caps.insert("migration".into(), Value::Object(mig));
        }
        if self.write_multiple {
            caps.insert("write_multiple".into(), true.into());
        }
        if let Some(t) = self.twin_socket {
            let mut twin = Map::new();
            twin.insert("supported".into(), t.supported.into());
            if let Some(i) = t.fd_index {
                twin.insert("fd_index".into(), i.into());
            }
            caps.insert("twin_socket".into(), Value::Object(twin));
        }
        let mut root = Map::new();
        root.insert("capabilities".into(), Value::Object(caps));
        Value::Object(root).to_string()
    }
}

/// A parsed VERSION payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionPayload {
    pub major: u16,
    pub minor: u16,
    pub caps: Capabilities,
}

impl VersionPayload {
    /// Parses a VERSION payload: 4-byte version, then optional NUL-terminated JSON.
    pub fn parse(payload: &[u8]) -> Result<VersionPayload, NegotiateError> {
        use zerocopy::FromBytes;
        let (v, rest) = crate::wire::Version::read_from_prefix(payload)
            .map_err(|_| NegotiateError::ParsePrefix)?;
        let json = match rest.split_last() {
            None => "",
            Some((0, body)) => {
                if body.contains(&0) {
                    return Err(NegotiateError::ParseTerminator);
                }
                std::str::from_utf8(body).map_err(|e| NegotiateError::ParseJson(e.to_string()))?
            }
            Some(_) => return Err(NegotiateError::ParseTerminator),
        };
        let caps = Capabilities::from_json(json)?;
        Ok(VersionPayload {
            major: v.major,
            minor: v.minor,
            caps,
        })
    }

    /// Encodes the payload with NUL-terminated compact JSON.
    pub fn encode(&self) -> Vec<u8> {
        use zerocopy::IntoBytes;
        let mut out = crate::wire::Version {
            major: self.major,
            minor: self.minor,
        }
        .as_bytes()
        .to_vec();
        out.extend_from_slice(self.caps.to_json().as_bytes());
        out.push(0);
        out
    }
}

/// What a server is willing to do; combined with the client's offer by [`negotiate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Most fds we accept in one message.
    pub max_msg_fds: u32,
    /// Largest data count we accept or send.
    pub max_data_xfer_size: u32,
    /// Most concurrent DMA maps we keep per client.
    pub max_dma_maps: u32,
    /// Whether REGION_WRITE_MULTI is implemented.
    pub write_multiple: bool,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_msg_fds: 16,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            write_multiple: true,
        }
    }
}

/// The outcome of one negotiation: what the server replies and the limits both sides follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Payload of the VERSION reply.
    pub reply: VersionPayload,
    /// Most fds the client accepts from us in one message.
    pub client_max_msg_fds: u32,
    /// Largest data count in messages we send to the client (DMA_READ/WRITE), exactly as the
    /// client announced it; 0 means it cannot take message DMA at all.
    pub client_max_data_xfer_size: u32,
    /// Largest data count we accept from the client.
    pub server_max_data_xfer_size: u32,
    pub max_dma_maps: u32,
    pub write_multiple: bool,
}

/// Server side of VERSION: validates the client's offer and builds the reply.
///
/// The reply's minor is `min(client, ours)`, its capabilities a subset of what the client
/// offered (write_multiple only if the client offered it; twin_socket is declined by omission).
pub fn negotiate(
    offer: &VersionPayload,
    ours: &ServerLimits,
) -> Result<Negotiated, NegotiateError> {
    if offer.major != MAJOR {
        return Err(NegotiateError::CheckMajor(offer.major));
    }
    if offer.caps.pgsizes & 0xfff != 0 || offer.caps.pgsizes & 4096 == 0 {
        return Err(NegotiateError::CheckCapability {
            key: "pgsizes",
            expected: "a bitmask including 4096 with the low 12 bits otherwise clear",
        });
    }
    let max_dma_maps = ours.max_dma_maps.min(offer.caps.max_dma_maps).max(1);
    let write_multiple = ours.write_multiple && offer.caps.write_multiple;
    let reply = VersionPayload {
        major: MAJOR,
        minor: offer.minor.min(MINOR),
        caps: Capabilities {
            max_msg_fds: ours.max_msg_fds,
            max_data_xfer_size: ours.max_data_xfer_size,
            max_dma_maps,
            pgsizes: DEFAULT_PGSIZES,
            migration: None,
            write_multiple,
            twin_socket: None,
        },
    };
    Ok(Negotiated {
        reply,
        client_max_msg_fds: offer.caps.max_msg_fds,
        client_max_data_xfer_size: offer.caps.max_data_xfer_size,
        server_max_data_xfer_size: ours.max_data_xfer_size,
        max_dma_maps,
        write_multiple,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact capabilities string QEMU 10.1's client sends (193 characters).
    const QEMU_JSON: &str = "{\"capabilities\": {\"max_msg_fds\": 16, \"max_data_xfer_size\": 1048576, \"pgsizes\": 4096, \"max_dma_maps\": 65535, \"migration\": {\"pgsize\": 4096, \"max_bitmap_size\": 268435456}, \"write_multiple\": true}}";

    fn payload(json: &str) -> Vec<u8> {
        VersionPayload {
            major: 0,
            minor: 0,
            caps: Capabilities::default(),
        }
        .encode()[..4]
            .iter()
            .copied()
            .chain(json.bytes())
            .chain([0])
            .collect()
    }

    #[test]
    fn qemu_offer_gets_a_reply_no_larger_than_its_request() {
        assert_eq!(QEMU_JSON.len(), 193);
        let offer = VersionPayload::parse(&payload(QEMU_JSON)).unwrap();
        assert_eq!(offer.caps.max_msg_fds, 16);
        assert!(offer.caps.write_multiple);
        assert_eq!(
            offer.caps.migration.unwrap().max_bitmap_size,
            Some(268435456)
        );
        let n = negotiate(&offer, &ServerLimits::default()).unwrap();
        assert_eq!(n.reply.minor, 0);
        let request_size = 16 + 4 + QEMU_JSON.len() + 1;
        assert_eq!(request_size, 214);
        let reply = n.reply.encode();
        assert!(
            16 + reply.len() <= request_size,
            "reply {} bytes",
            16 + reply.len()
        );
        assert!(!n.reply.caps.to_json().contains(' '));
        assert!(n.write_multiple);
    }

    #[test]
    fn no_json_means_defaults_and_unknown_keys_are_ignored() {
        let bare = VersionPayload::parse(&[0, 0, 2, 0]).unwrap();
        assert_eq!(bare.caps, Capabilities::default());
        let alioth = VersionPayload::parse(&payload("{\"capabilities\":{\"max_fds\":8}}")).unwrap();
        assert_eq!(alioth.caps.max_msg_fds, DEFAULT_MAX_MSG_FDS);
        let n = negotiate(&bare, &ServerLimits::default()).unwrap();
        assert_eq!(n.reply.minor, 2);
        assert!(
            !n.write_multiple,
            "write_multiple must not be granted unasked"
        );
    }

    #[test]
    fn malformed_offers_are_rejected() {
        assert_eq!(
            VersionPayload::parse(&[0, 0]),
            Err(NegotiateError::ParsePrefix)
        );
        let mut no_nul = payload("{}");
        no_nul.pop();
        assert_eq!(
            VersionPayload::parse(&no_nul),
            Err(NegotiateError::ParseTerminator)
        );
        assert!(matches!(
            VersionPayload::parse(&payload("{")),
            Err(NegotiateError::ParseJson(_))
        ));
        assert!(VersionPayload::parse(&payload("[]")).is_err());
        assert!(
            VersionPayload::parse(&payload("{\"capabilities\":{\"max_msg_fds\":\"x\"}}")).is_err()
        );
        assert!(
            VersionPayload::parse(&payload("{\"capabilities\":{\"max_msg_fds\":-1}}")).is_err()
        );
        assert!(VersionPayload::parse(&payload(
            "{\"capabilities\":{\"max_data_xfer_size\":99999999999}}"
        ))
        .is_err());
        let major1 = VersionPayload {
            major: 1,
            minor: 0,
            caps: Capabilities::default(),
        };
        assert_eq!(
            negotiate(&major1, &ServerLimits::default()),
            Err(NegotiateError::CheckMajor(1))
        );
        let bad_pg =
            VersionPayload::parse(&payload("{\"capabilities\":{\"pgsizes\":4097}}")).unwrap();
        assert!(negotiate(&bad_pg, &ServerLimits::default()).is_err());
    }

    #[test]
    fn json_round_trips() {
        let caps = Capabilities {
            max_msg_fds: 8,
            max_data_xfer_size: 4096,
            max_dma_maps: 10,
            pgsizes: 4096 | (2 << 20),
            migration: Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size: Some(1),
            }),
            write_multiple: true,
            twin_socket: Some(TwinSocket {
                supported: true,
                fd_index: Some(0),
            }),
        };
        assert_eq!(Capabilities::from_json(&caps.to_json()).unwrap(), caps);
    }
}
