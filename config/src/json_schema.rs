//! The JSON Schema of a device configuration, for editors and `vfud print-schema`.
//!
//! Most of it is derived from the serde types, so it cannot drift from what the parser
//! accepts. The two types with hand-written deserializers (which accept a string or an
//! integer) describe themselves here. Rules the schema cannot express (the `version` value,
//! the name alphabet, uniqueness across files) are still checked by the loader; the schema
//! states them in descriptions.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::policy::{CompatLevel, PasidCapOffset, EXT_CAP_MIN_OFFSET, PASID_CAP_MAX_OFFSET};
use crate::schema::{DeviceConfig, CONFIG_VERSION, MAX_NAME_LEN};
use crate::viommu::{Auto, RawRegister, RequesterIdSpec};

impl<T: JsonSchema> JsonSchema for Auto<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("Auto_{}", T::schema_name()).into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let value = generator.subschema_for::<T>();
        json_schema!({
            "description": "\"auto\" (resolved from the host IOMMU at the first device) or a value the host must be able to honour.",
            "oneOf": [{"const": "auto"}, value]
        })
    }
}

impl JsonSchema for RawRegister {
    fn schema_name() -> Cow<'static, str> {
        "RawRegister".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A register value: an integer, or a string in hexadecimal (\"0x19ed008c40780c66\") or decimal; strings keep 64-bit values exact.",
            "oneOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^(0[xX][0-9a-fA-F_]+|[0-9]+)$"}
            ]
        })
    }
}

impl JsonSchema for CompatLevel {
    fn schema_name() -> Cow<'static, str> {
        "CompatLevel".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let names: Vec<&str> = CompatLevel::ALL.iter().map(|l| l.as_str()).collect();
        let numbers: Vec<u64> = names.iter().filter_map(|n| n.parse().ok()).collect();
        json_schema!({
            "description": "Compatibility level whose capability defaults apply to unset policies: \"0\" passes capabilities through (ats=on, pri=on, pasid=off); \"1\" (current) makes ats, pasid and pri auto. A string; an integer is accepted too.",
            "oneOf": [
                {"type": "string", "enum": names},
                {"type": "integer", "enum": numbers}
            ]
        })
    }
}

impl JsonSchema for PasidCapOffset {
    fn schema_name() -> Cow<'static, str> {
        "PasidCapOffset".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let (min, max) = (EXT_CAP_MIN_OFFSET, PASID_CAP_MAX_OFFSET);
        json_schema!({
            "description": format!("Config-space offset of the synthesized PASID capability: 4-byte aligned, {min:#x} to {max:#x}. An integer, or a string in hexadecimal (\"0xff8\") or decimal."),
            "oneOf": [
                {"type": "integer", "minimum": min, "maximum": max, "multipleOf": 4},
                {"type": "string", "pattern": "^(0[xX][0-9a-fA-F]+|[0-9]+)$"}
            ]
        })
    }
}

impl JsonSchema for RequesterIdSpec {
    fn schema_name() -> Cow<'static, str> {
        "RequesterIdSpec".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A PCI requester id on segment 0: \"00:03.0\" (bus:device.function, hexadecimal), \"0000:00:03.0\", or the integer bus << 8 | device << 3 | function.",
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 65535},
                {"type": "string", "pattern": "^([0]{4}:)?[0-9a-fA-F]{2}:[01][0-9a-fA-F]\\.[0-7]$"}
            ]
        })
    }
}

/// The JSON Schema (draft 2020-12) of one device configuration file.
pub fn device_config_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(DeviceConfig);
    // serde sees `version` and `name` as a plain integer and string; the loader is stricter.
    if let Some(props) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        if let Some(version) = props.get_mut("version") {
            version["const"] = CONFIG_VERSION.into();
        }
        if let Some(name) = props.get_mut("name") {
            name["pattern"] = "^[A-Za-z0-9_][A-Za-z0-9_.-]*$".into();
            name["minLength"] = 1.into();
            name["maxLength"] = MAX_NAME_LEN.into();
        }
    }
    schema.to_value()
}
