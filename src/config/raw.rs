//! Raw serde view of the TOML file.
//!
//! Every leaf is wrapped in [`Spanned`] so that validation can point at the
//! exact key or value. Values are kept loosely typed here (strings and
//! integers); the conversion into enums, addresses and bounded numbers happens
//! in `validate.rs`, where all problems are collected instead of stopping at
//! the first one. Serde itself only rejects structural problems: syntax
//! errors, unknown keys, missing required keys and wrong value types.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

/// A TOML integer. Exists for its error message ("expected an integer"
/// instead of serde's "expected i64").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                i64::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom(format!("integer {v} is too large")))
            }
        }
        deserializer.deserialize_i64(IntVisitor)
    }
}

/// Generates a `Vec` wrapper whose "invalid type" message names what the
/// configuration expects.
macro_rules! seq_wrapper {
    ($(#[$doc:meta])* $name:ident, $item:ty, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name<T>(pub Vec<$item>);

        impl<T> Default for $name<T> {
            fn default() -> Self {
                $name(Vec::new())
            }
        }

        impl<'de, T: Deserialize<'de>> Deserialize<'de> for $name<T> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct SeqVisitor<T>(PhantomData<T>);
                impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
                    type Value = $name<T>;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                        let mut items = Vec::new();
                        while let Some(item) = seq.next_element()? {
                            items.push(item);
                        }
                        Ok($name(items))
                    }
                }
                deserializer.deserialize_seq(SeqVisitor(PhantomData))
            }
        }
    };
}

seq_wrapper!(
    /// A TOML array of values (`workers = [0, 1]`).
    Array,
    T,
    "an array"
);
seq_wrapper!(
    /// A TOML array of tables (`[[listener]]`); each table keeps its span,
    /// which starts at its `[[...]]` header.
    Tables,
    Spanned<T>,
    "an array of tables (written as [[...]] headers)"
);

/// Generates a wrapper of a table that is written once (`[a.b]`), which
/// accepts only a table. Serde's derived structs also accept an array of
/// their fields' values, so `[[a.b]]` read as `first_key = <the table>`
/// and was reported as "invalid type: map, expected a string".
macro_rules! table_wrapper {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(crate) struct $name(pub $inner);

        impl std::ops::Deref for $name {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct TableVisitor;
                impl<'de> Visitor<'de> for TableVisitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<$name, A::Error> {
                        <$inner>::deserialize(de::value::MapAccessDeserializer::new(map)).map($name)
                    }
                }
                deserializer.deserialize_map(TableVisitor)
            }
        }
    };
}

table_wrapper!(
    /// `[instance]`.
    InstanceTable,
    RawInstance,
    "a table (written as an [instance] header)"
);
table_wrapper!(
    /// `[backend_service.health_check]`.
    HealthCheckTable,
    RawHealthCheck,
    "a table (written as a [backend_service.health_check] header)"
);

pub(crate) type Str = Spanned<String>;
pub(crate) type Num = Spanned<Int>;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawConfig {
    pub instance: Spanned<InstanceTable>,
    #[serde(default)]
    pub listener: Tables<RawListener>,
    #[serde(default)]
    pub backend_service: Tables<RawService>,
    #[serde(default)]
    pub availability_group: Tables<RawGroup>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawInstance {
    pub name: Str,
    pub mode: Option<Str>,
    pub client_interface: Str,
    pub backend_interface: Str,
    pub client_gateway: Str,
    pub attach: Option<Str>,
    pub bind: Option<Str>,
    pub workers: Option<Spanned<Array<Num>>>,
    pub flow_table_capacity: Option<Num>,
    pub flow_idle_timeout: Option<Num>,
    pub tcp_closed_timeout: Option<Num>,
    pub tcp_syn_timeout: Option<Num>,
    pub persistence_capacity: Option<Num>,
    pub persistence_when_full: Option<Str>,
    pub control_socket: Option<Str>,
    #[serde(default)]
    pub neighbour: Tables<RawNeighbour>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawNeighbour {
    pub address: Str,
    pub mac: Str,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawListener {
    pub name: Str,
    pub vip: Str,
    pub protocol: Str,
    pub port: Num,
    pub backend_service: Str,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawService {
    pub name: Str,
    pub protocol: Str,
    pub scheduler: Option<Str>,
    pub persistence_timeout: Option<Num>,
    pub on_all_down: Option<Str>,
    pub availability_groups: Option<Spanned<Array<Str>>>,
    pub health_check: Option<Spanned<HealthCheckTable>>,
    #[serde(default)]
    pub server: Tables<RawServer>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawHealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<Str>,
    pub port: Option<Num>,
    pub timeout: Option<Num>,
    pub interval: Option<Num>,
    pub unhealthy_threshold: Option<Num>,
    pub healthy_threshold: Option<Num>,
    pub path: Option<Str>,
    pub domain: Option<Str>,
    pub http_codes: Option<Str>,
    pub udp_payload: Option<Str>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawServer {
    pub address: Str,
    pub port: Num,
    pub weight: Option<Num>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub(crate) struct RawGroup {
    pub name: Str,
    #[serde(default)]
    pub server: Tables<RawServer>,
}
