use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    marker::PhantomData,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{
        self, DeserializeSeed, Error as _, IntoDeserializer, MapAccess, Visitor,
        value::MapAccessDeserializer,
    },
    forward_to_deserialize_any,
};
use serde_json::value::RawValue;

use super::{
    Bind, ClientLimits, HelloConditions, IPV4_MAPPED, Keepalive, NamePattern, PortSpec,
    SniCondition, Timeouts,
    balance::{Balance, Balancing, PoolServer, RawBalancing, RawHealth, RawObserve},
    connect::RawConnectFront,
    no_tcp_to,
    parent::{Parent, RawParent},
    tls::{Originate, RawOriginate, RawTerminate, Terminate},
};

/// A struct read from a JSON object only: serde_json would also take an
/// array of the field values, which no one means to write in a policy. Its
/// `comment` is skipped (see [`SkipComment`]).
pub(super) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(ObjectOnly(deserializer)).map(Object)
    }
}

struct ObjectOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(Commented(visitor))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(Commented(visitor))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct
        enum identifier ignored_any
    }
}

/// The key of a note for people, allowed in every object of a policy.
const COMMENT: &str = "comment";

/// Hands a visitor an object's entries with its `comment` left out.
struct Commented<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for Commented<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(SkipComment::new(map))
    }
}

/// `T`'s fields from an object's entries, its `comment` left out: for
/// visitors that take an object among other kinds of value.
pub(super) fn fields_of<'de, T, A>(map: A) -> Result<T, A::Error>
where
    T: Deserialize<'de>,
    A: MapAccess<'de>,
{
    T::deserialize(MapAccessDeserializer::new(SkipComment::new(map)))
}

/// A JSON object's entries without its `comment`: one place for every
/// object, rather than a field in each struct. The comment must be a string
/// (anything else is more likely a field gone astray) and is checked with
/// its path and position like any value; like any field, it comes once.
struct SkipComment<A> {
    map: A,
    seen: bool,
}

impl<A> SkipComment<A> {
    fn new(map: A) -> Self {
        SkipComment { map, seen: false }
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipComment<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = Some(seed);
        loop {
            let key = KeyUnlessComment {
                seed: &mut seed,
                seen: &mut self.seen,
            };
            match self.map.next_key_seed(key)? {
                None => return Ok(None),
                Some(Some(key)) => return Ok(Some(key)),
                Some(None) => self.map.next_value::<Comment>()?,
            };
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// Reads a key, and unless it is the comment, hands it to `seed`: `None`
/// for the comment. Done inside the map's own key reading, so that errors
/// about the key (unknown field, ...) carry the key in their path, as
/// they would without the comment skipped.
struct KeyUnlessComment<'s, K> {
    /// Taken by the first key that is not the comment.
    seed: &'s mut Option<K>,
    seen: &'s mut bool,
}

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeyUnlessComment<'_, K> {
    type Value = Option<K::Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // Read as a string to be looked at, then handed on: serde's field
        // identifiers take a string as well as the key itself, with the
        // same messages.
        let key = String::deserialize(deserializer)?;
        if key == COMMENT {
            if std::mem::replace(self.seen, true) {
                return Err(D::Error::custom(format!("duplicate field `{COMMENT}`")));
            }
            return Ok(None);
        }
        let seed = (self.seed.take()).expect("SkipComment stops at the first other key");
        seed.deserialize(IntoDeserializer::<D::Error>::into_deserializer(key))
            .map(Some)
    }
}

/// A comment's text, checked to be a string and dropped.
struct Comment;

impl<'de> Deserialize<'de> for Comment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(Comment)
    }
}

impl Visitor<'_> for Comment {
    type Value = Comment;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string (\"comment\" is a note for people, allowed on any object)")
    }

    fn visit_str<E: de::Error>(self, _text: &str) -> Result<Comment, E> {
        Ok(Comment)
    }
}

/// Reads a JSON object as `F`, then checks it as a whole into `T`. The check
/// runs inside the object, so that serde_json puts its error right after the
/// closing brace; `#[serde(try_from)]` would run it later, and the error
/// would point at whatever follows the object.
fn whole_object<'de, D, F, T>(deserializer: D, expecting: &'static str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: Deserialize<'de>,
    T: TryFrom<F, Error: fmt::Display>,
{
    struct Whole<F, T> {
        expecting: &'static str,
        types: PhantomData<fn(F) -> T>,
    }

    impl<'de, F, T> Visitor<'de> for Whole<F, T>
    where
        F: Deserialize<'de>,
        T: TryFrom<F, Error: fmt::Display>,
    {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let fields = fields_of::<F, A>(map)?;
            T::try_from(fields).map_err(A::Error::custom)
        }
    }

    deserializer.deserialize_map(Whole {
        expecting,
        types: PhantomData,
    })
}

/// A policy's top level, each rule, route and upstream left as the text it
/// is written as: they are read one by one afterwards (`super::parse`), so
/// that an error in one does not hide the errors in the others.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a policy object with \"intercept\" and \"upstreams\""
)]
pub(super) struct Outline<'a> {
    #[serde(borrow, deserialize_with = "non_empty")]
    pub intercept: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    pub routes: Vec<&'a RawValue>,
    #[serde(borrow, deserialize_with = "unique_upstreams")]
    pub upstreams: Vec<(String, &'a RawValue)>,
}

/// A policy whose rules, routes and upstreams each read cleanly; the checks
/// across them are `super::check`'s.
pub(super) struct Policy {
    pub intercept: Vec<Object<Rule>>,
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, Upstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct Rule {
    pub name: Name,
    #[serde(default, deserialize_with = "some_non_empty")]
    pub prefixes: Option<Vec<Prefix>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    pub ports: Option<Vec<Port>>,
    #[serde(default, deserialize_with = "some")]
    pub connect: Option<Object<RawConnectFront>>,
    #[serde(default, deserialize_with = "some")]
    pub upstream: Option<String>,
    #[serde(default, deserialize_with = "some_non_empty")]
    pub interfaces: Option<Vec<Interface>>,
    #[serde(default, deserialize_with = "some")]
    pub accept_proxy_protocol: Option<Object<AcceptProxyProtocol>>,
    #[serde(default, deserialize_with = "some")]
    pub timeouts: Option<Object<Timeouts>>,
    #[serde(default, deserialize_with = "some")]
    pub keepalive: Option<Keepalive>,
    #[serde(default, deserialize_with = "some")]
    pub limits: Option<Object<ClientLimits>>,
    #[serde(default, deserialize_with = "some")]
    pub terminate: Option<Object<RawTerminate>>,
}

/// Where a rule takes PROXY protocol headers from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct AcceptProxyProtocol {
    #[serde(deserialize_with = "non_empty")]
    pub from: Vec<Prefix>,
}

/// A route with exactly one action.
pub(super) struct Route {
    pub name: Option<Name>,
    pub conditions: Conditions,
    pub action: Action,
    pub bind: Option<Bind>,
    pub timeouts: Timeouts,
    pub terminate: Option<Terminate>,
}

pub(super) enum Action {
    Upstream(String),
    Reject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct RouteFields {
    #[serde(default, deserialize_with = "some")]
    name: Option<Name>,
    #[serde(rename = "match")]
    conditions: Conditions,
    #[serde(default, deserialize_with = "some")]
    upstream: Option<String>,
    #[serde(default, deserialize_with = "some")]
    reject: Option<True>,
    #[serde(default, deserialize_with = "some")]
    bind: Option<BindSpec>,
    #[serde(default, deserialize_with = "some")]
    timeouts: Option<Object<Timeouts>>,
    #[serde(default, deserialize_with = "some")]
    terminate: Option<Object<RawTerminate>>,
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        whole_object::<_, RouteFields, _>(deserializer, "a route object")
    }
}

impl TryFrom<RouteFields> for Route {
    type Error = &'static str;
    fn try_from(fields: RouteFields) -> Result<Self, Self::Error> {
        let action = match (fields.upstream, fields.reject) {
            (Some(upstream), None) => Action::Upstream(upstream),
            (None, Some(True)) if fields.bind.is_some() => {
                return Err(
                    r#"a rejecting route makes no upstream connection: "bind" needs "upstream""#,
                );
            }
            (None, Some(True)) if fields.timeouts.is_some() => {
                return Err(r#"a rejecting route relays nothing: "timeouts" needs "upstream""#);
            }
            (None, Some(True)) if fields.terminate.is_some() => {
                return Err(
                    r#"a rejecting route relays nothing: "terminate" needs "upstream" (a refused TLS client gets a reset)"#,
                );
            }
            (None, Some(True)) => Action::Reject,
            (None, None) => {
                return Err(r#"a route needs an action: "upstream": NAME or "reject": true"#);
            }
            (Some(_), Some(True)) => {
                return Err(r#"a route takes "upstream" or "reject", not both"#);
            }
        };
        Ok(Route {
            name: fields.name,
            conditions: fields.conditions,
            action,
            bind: fields.bind.map(|b| b.0),
            timeouts: fields.timeouts.map(|t| t.0).unwrap_or_default(),
            terminate: fields.terminate.map(Terminate::from),
        })
    }
}

/// A route's `match`, its conditions checked against each other: what the
/// client sends first is one protocol, so conditions of two protocols could
/// never hold together.
pub(super) struct Conditions {
    pub intercept: Option<Vec<Name>>,
    pub destination: Option<Vec<Prefix>>,
    pub ports: Option<Vec<Port>>,
    pub source: Option<Vec<Prefix>>,
    pub target: Option<Vec<NamePattern>>,
    pub hello: Option<HelloConditions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct ConditionFields {
    #[serde(default, deserialize_with = "some_non_empty")]
    intercept: Option<Vec<Name>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    destination: Option<Vec<Prefix>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    ports: Option<Vec<Port>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    source: Option<Vec<Prefix>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    target: Option<Vec<Pattern>>,
    #[serde(default, deserialize_with = "some_word")]
    protocol: Option<Protocol>,
    #[serde(default, deserialize_with = "some_non_empty")]
    sni: Option<Vec<Pattern>>,
    #[serde(default, deserialize_with = "some")]
    no_sni: Option<True>,
    #[serde(default, deserialize_with = "some_non_empty")]
    alpn: Option<Vec<Alpn>>,
    #[serde(default, deserialize_with = "some_non_empty")]
    host: Option<Vec<Pattern>>,
}

impl<'de> Deserialize<'de> for Conditions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        whole_object::<_, ConditionFields, _>(deserializer, "an object of conditions")
    }
}

impl TryFrom<ConditionFields> for Conditions {
    type Error = String;
    fn try_from(fields: ConditionFields) -> Result<Self, Self::Error> {
        let patterns = |list: Vec<Pattern>| list.into_iter().map(|p| p.0).collect();
        // The TLS conditions given, by name, for the messages.
        let tls: Vec<&str> = [
            ("sni", fields.sni.is_some()),
            ("no_sni", fields.no_sni.is_some()),
            ("alpn", fields.alpn.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        let implied = match (tls.first(), &fields.host) {
            (Some(tls), Some(_)) => {
                return Err(format!(
                    "\"host\" (HTTP) and {tls:?} (TLS) never hold together: \
                     a connection starts with one protocol; write two routes"
                ));
            }
            (Some(tls), None) => Some((Protocol::Tls, *tls)),
            (None, Some(_)) => Some((Protocol::Http, "host")),
            (None, None) => None,
        };
        let protocol = match (fields.protocol, implied) {
            (Some(given), Some((implied, by))) if given != implied => {
                return Err(format!(
                    "\"protocol\": {:?} contradicts {by:?}, which means {:?}",
                    given.name(),
                    implied.name()
                ));
            }
            (given, implied) => given.or(implied.map(|(protocol, _)| protocol)),
        };
        let sni = match (fields.sni, fields.no_sni) {
            (Some(_), Some(True)) => {
                return Err("\"sni\" and \"no_sni\" never hold together: \
                            a ClientHello has a server name or not"
                    .to_owned());
            }
            (Some(names), None) => SniCondition::Names(patterns(names)),
            (None, Some(True)) => SniCondition::Absent,
            (None, None) => SniCondition::Any,
        };
        // A TLS condition implies "tls" and the checks above refuse any other
        // protocol with it: `sni` and `alpn` only matter for "tls".
        let hello = protocol.map(|protocol| match protocol {
            Protocol::Tls => HelloConditions::Tls {
                sni,
                alpn: fields
                    .alpn
                    .map(|list| list.into_iter().map(|a| a.0).collect()),
            },
            Protocol::Http => HelloConditions::Http {
                host: fields.host.map(patterns),
            },
            Protocol::Other => HelloConditions::Other,
        });
        Ok(Conditions {
            intercept: fields.intercept,
            destination: fields.destination,
            ports: fields.ports,
            source: fields.source,
            target: fields.target.map(patterns),
            hello,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Tls,
    Http,
    Other,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Other => "other",
        }
    }
}

/// `true`, the only value of a flag: `false` would read as a condition or
/// action that it is not.
struct True;

impl<'de> Deserialize<'de> for True {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match bool::deserialize(deserializer)? {
            true => Ok(True),
            false => Err(D::Error::custom(
                "only true means something here; omit the field instead of writing false",
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Pattern(pub NamePattern);

impl TryFrom<String> for Pattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        NamePattern::parse(&text).map(Pattern)
    }
}

/// An ALPN protocol ID: 1-255 bytes on the wire, compared exactly.
#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Alpn(pub String);

impl TryFrom<String> for Alpn {
    type Error = String;
    fn try_from(id: String) -> Result<Self, Self::Error> {
        match id.len() {
            0 => Err("an ALPN protocol must not be empty".to_owned()),
            1..=255 => Ok(Alpn(id)),
            len => Err(format!("an ALPN protocol is at most 255 bytes, got {len}")),
        }
    }
}

/// An upstream with exactly one target.
pub(super) struct Upstream {
    pub target: Target,
    pub bind: Bind,
    pub proxy_protocol: Option<ProxyVersion>,
    pub tls: Option<Originate>,
    pub balancing: Balancing,
}

pub(super) enum Target {
    Servers(Vec<Server>),
    OriginalDestination,
    Parent(Parent),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
struct UpstreamFields {
    #[serde(default, deserialize_with = "some_non_empty")]
    servers: Option<Vec<PoolServer>>,
    #[serde(default, deserialize_with = "some")]
    original_destination: Option<True>,
    #[serde(default, deserialize_with = "some")]
    parent: Option<Object<RawParent>>,
    #[serde(default, deserialize_with = "some")]
    bind: Option<BindSpec>,
    #[serde(default, deserialize_with = "some_word")]
    proxy_protocol: Option<ProxyVersion>,
    #[serde(default, deserialize_with = "some")]
    tls: Option<Object<RawOriginate>>,
    #[serde(default, deserialize_with = "some_word")]
    balance: Option<Balance>,
    #[serde(default, deserialize_with = "some")]
    retries: Option<u32>,
    #[serde(default, deserialize_with = "some")]
    health: Option<Object<RawHealth>>,
    #[serde(default, deserialize_with = "some")]
    observe: Option<Object<RawObserve>>,
}

/// `"v1"` or `"v2"`.
#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProxyVersion {
    V1,
    V2,
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        whole_object::<_, UpstreamFields, _>(deserializer, "an upstream object")
    }
}

impl TryFrom<UpstreamFields> for Upstream {
    type Error = &'static str;
    fn try_from(fields: UpstreamFields) -> Result<Self, Self::Error> {
        let (servers, options) = match fields.servers {
            Some(servers) => {
                let (addresses, options) = servers
                    .into_iter()
                    .map(|server| (server.address, server.options))
                    .unzip();
                (Some(addresses), options)
            }
            None => (None, Vec::new()),
        };
        let target = match (servers, fields.original_destination, fields.parent) {
            (Some(servers), None, None) => Target::Servers(servers),
            (None, Some(True), None) => Target::OriginalDestination,
            (None, None, Some(parent)) => Target::Parent(Parent::try_from(parent)?),
            (None, None, None) => {
                return Err(
                    r#"an upstream needs "servers": [...], "original_destination": true or "parent": {...}"#,
                );
            }
            _ => {
                return Err(
                    r#"an upstream takes one of "servers", "original_destination" and "parent""#,
                );
            }
        };
        let count = match &target {
            Target::Servers(servers) => servers.len(),
            Target::Parent(parent) => parent.servers.len(),
            Target::OriginalDestination => 0,
        };
        let balancing = RawBalancing {
            balance: fields.balance,
            retries: fields.retries,
            health: fields.health,
            observe: fields.observe,
        };
        Ok(Upstream {
            target,
            bind: fields.bind.map_or(Bind::Proxy, |b| b.0),
            proxy_protocol: fields.proxy_protocol,
            tls: fields.tls.map(Originate::from),
            balancing: Balancing::of(balancing, options, count, fields.proxy_protocol.is_some())?,
        })
    }
}

/// `"proxy"`, `"client-ip"`, `"client"` or an IP address.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct BindSpec(Bind);

impl TryFrom<String> for BindSpec {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        let bind = match text.as_str() {
            "proxy" => Bind::Proxy,
            "client-ip" => Bind::ClientIp,
            "client" => Bind::Client,
            other => {
                let addr: IpAddr = other.parse().map_err(|_| {
                    format!(
                        "expected \"proxy\", \"client-ip\", \"client\" or an IP address, got {text:?}"
                    )
                })?;
                if addr.is_unspecified() {
                    return Err(format!(
                        "{addr} is the kernel's choice: write \"proxy\" instead"
                    ));
                }
                if no_tcp_to(addr) {
                    return Err(format!("{addr} is a multicast or broadcast address"));
                }
                if let IpAddr::V6(v6) = addr
                    && let Some(v4) = v6.to_ipv4_mapped()
                {
                    return Err(format!("IPv4-mapped IPv6 address; use the IPv4 form {v4}"));
                }
                if let IpAddr::V6(v6) = addr
                    && v6.is_unicast_link_local()
                {
                    return Err(format!(
                        "{addr} is link-local: binding it needs its interface, which a bind address cannot name; use a global address"
                    ));
                }
                Bind::Address(addr)
            }
        };
        Ok(BindSpec(bind))
    }
}

/// A network interface name as the kernel takes it: 1-15 bytes, no `/`,
/// no whitespace.
#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Interface(pub String);

/// IFNAMSIZ less the terminating NUL.
const MAX_INTERFACE_NAME: usize = 15;

impl TryFrom<String> for Interface {
    type Error = String;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
            return Err(format!(
                "an interface name is 1-{MAX_INTERFACE_NAME} bytes, got {name:?}"
            ));
        }
        if name == "."
            || name == ".."
            || name.contains(['/', ':'])
            || name.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{name:?} is not a valid interface name"));
        }
        if name == "lo" {
            return Err("\"lo\" carries no forwarded traffic; a rule without \"interfaces\" takes connections made on this host".to_owned());
        }
        Ok(Interface(name))
    }
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Name(pub String);

impl TryFrom<String> for Name {
    type Error = &'static str;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        if name.is_empty() {
            return Err("name must not be empty");
        }
        Ok(Name(name))
    }
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Prefix(pub IpNet);

impl TryFrom<String> for Prefix {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("expected an address prefix like 192.0.2.0/24, got {text:?}"))?;
        if let Some(number) = leading_zero(&text) {
            return Err(format!(
                "{number} in {text:?} has a leading zero, which other tools read as octal; write {net}"
            ));
        }
        if net.trunc() != net {
            return Err(format!("host bits set; did you mean {}?", net.trunc()));
        }
        if let IpNet::V6(v6) = net
            && IPV4_MAPPED.contains(&v6)
            && let Some(v4) = v6.network().to_ipv4_mapped()
        {
            return Err(format!(
                "IPv4-mapped IPv6 prefix; use the IPv4 form {v4}/{}",
                v6.prefix_len() - IPV4_MAPPED.prefix_len()
            ));
        }
        // Multicast is one aligned block per family: ends in it, all in it.
        let multicast = net.network().is_multicast() && net.broadcast().is_multicast();
        if multicast || (net.prefix_len() == 32 && no_tcp_to(net.network())) {
            return Err(format!(
                "{net} is multicast or broadcast: no TCP connection goes there"
            ));
        }
        Ok(Prefix(net))
    }
}

/// An IPv4 prefix's octet, or any prefix's length, written with a leading
/// zero (`010.0.0.0/8`, `2001:db8::/064`), if one is.
fn leading_zero(prefix: &str) -> Option<&str> {
    let (address, length) = prefix.split_once('/').unwrap_or((prefix, ""));
    let zero_led = |number: &&str| number.len() > 1 && number.starts_with('0');
    let octets = (!address.contains(':'))
        .then(|| address.split('.'))
        .into_iter()
        .flatten();
    octets.chain([length]).find(zero_led)
}

#[derive(Deserialize)]
#[serde(try_from = "String")]
pub(super) struct Server(pub SocketAddr);

impl TryFrom<String> for Server {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        // Refused as in prefixes and ports: `203.0.113.02:80`, `…:0080`.
        let (host, port) = text.rsplit_once(':').unwrap_or((&text, ""));
        if let Some(number) = leading_zero(host) {
            return Err(format!(
                "{number} in {text:?} has a leading zero, which other tools read as octal"
            ));
        }
        if port.len() > 1 && port.starts_with('0') {
            return Err(format!("the port in {text:?} has a leading zero"));
        }
        let addr: SocketAddr = text.parse().map_err(|_| {
            format!("expected a server address like 203.0.113.2:8080 or [2001:db8::2]:8080, got {text:?}")
        })?;
        if addr.port() == 0 {
            return Err("port must be 1-65535, got 0".to_owned());
        }
        let ip = addr.ip();
        if no_tcp_to(ip) {
            return Err(format!("{ip} is a multicast or broadcast address"));
        }
        if let SocketAddr::V6(v6) = addr {
            if let Some(v4) = v6.ip().to_ipv4_mapped() {
                return Err(format!(
                    "IPv4-mapped IPv6 address; use the IPv4 form {v4}:{}",
                    addr.port()
                ));
            }
            if v6.scope_id() == 0 && v6.ip().is_unicast_link_local() {
                return Err(format!(
                    "a link-local address needs its zone, the index of its interface (`ip -6 link` lists them): [{}%2]:{}",
                    v6.ip(),
                    addr.port()
                ));
            }
            // The kernel ignores it elsewhere: the same address twice would
            // pass as two.
            if v6.scope_id() != 0 && !v6.ip().is_unicast_link_local() {
                return Err(format!(
                    "a zone (%{}) belongs only to a link-local address (fe80::/10)",
                    v6.scope_id()
                ));
            }
        }
        Ok(Server(addr))
    }
}

/// A number, `"N-M"` or `"*"`.
pub(super) struct Port(pub PortSpec);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortVisitor).map(Port)
    }
}

struct PortVisitor;

impl Visitor<'_> for PortVisitor {
    type Value = PortSpec;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a port number, a \"N-M\" range or \"*\"")
    }

    fn visit_u64<E: de::Error>(self, port: u64) -> Result<PortSpec, E> {
        port_number(port).map(PortSpec::Single).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, port: i64) -> Result<PortSpec, E> {
        match u64::try_from(port) {
            Ok(port) => self.visit_u64(port),
            Err(_) => Err(E::custom(format!("port must be 1-65535, got {port}"))),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<PortSpec, E> {
        if text == "*" {
            return Ok(PortSpec::Any);
        }
        let not_a_port = || {
            E::custom(format!(
                "expected a port number, a \"N-M\" range or \"*\", got {text:?}"
            ))
        };
        let (first, last) = text.split_once('-').ok_or_else(not_a_port)?;
        // Digits only, as a JSON number has them: no sign, no leading zero.
        let number = |part: &str| match part.as_bytes() {
            [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {
                part.parse::<u64>().map_err(|_| not_a_port())
            }
            _ => Err(not_a_port()),
        };
        let (first, last) = (number(first)?, number(last)?);
        let (first, last) = (
            port_number(first).map_err(E::custom)?,
            port_number(last).map_err(E::custom)?,
        );
        if first >= last {
            return Err(E::custom(format!(
                "a port range must be \"N-M\" with N < M, got {text:?}"
            )));
        }
        // Every port a connection can have: the same as "*", so that two
        // rules writing it each way on one prefix are a tie, not one rule
        // silently dead behind the other.
        if (first, last) == (1, u16::MAX) {
            return Ok(PortSpec::Any);
        }
        Ok(PortSpec::Range(first, last))
    }
}

fn port_number(port: u64) -> Result<u16, String> {
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port must be 1-65535, got {port}")),
    }
}

/// For optional fields: present means a value, never `null`.
pub(super) fn some<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For optional fixed words (`"tls"`, `"v2"`, `"round-robin"`, `"1.3"`): a
/// string only. A derived enum would also take serde's one-key object form
/// (`{"tls": null}`), which the format does not have.
pub(super) fn some_word<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: de::DeserializeOwned,
{
    let word = String::deserialize(deserializer)?;
    T::deserialize(word.as_str().into_deserializer())
        .map(Some)
        .map_err(|e: de::value::Error| D::Error::custom(e))
}

/// For optional list conditions: an empty list could never hold.
pub(super) fn some_non_empty<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    non_empty(deserializer).map(Some)
}

pub(super) fn non_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let items = Vec::<T>::deserialize(deserializer)?;
    if items.is_empty() {
        return Err(D::Error::custom("must not be empty"));
    }
    Ok(items)
}

/// Like a map, but a repeated name is an error rather than the last one
/// winning; in the order written, each upstream's text to be read later.
fn unique_upstreams<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(String, &'de RawValue)>, D::Error> {
    struct Upstreams;

    impl<'de> Visitor<'de> for Upstreams {
        type Value = Vec<(String, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object mapping upstream names to upstreams")
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let mut map = SkipComment::new(map);
            let mut upstreams = Vec::new();
            let mut names = HashSet::new();
            while let Some(Name(name)) = map.next_key()? {
                if !names.insert(name.clone()) {
                    return Err(A::Error::custom(format!(
                        "duplicate upstream name {name:?}"
                    )));
                }
                let upstream = map.next_value()?;
                upstreams.push((name, upstream));
            }
            Ok(upstreams)
        }
    }

    deserializer.deserialize_map(Upstreams)
}
