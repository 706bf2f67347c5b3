//! Local delivery of packets whose destination is not this host's: the
//! policy routing the classic TPROXY recipe sets up by hand, installed over
//! rtnetlink and removed on exit.
//!
//! - `ip rule add fwmark MARK/MASK lookup TABLE`: what `classify` marked
//!   (forwarded packets of gateway rules, replies to transparent sockets);
//! - `ip route add local default dev lo table TABLE`: "deliver here";
//! - for an upstream server on this host that is connected to from client
//!   addresses: `ip rule add iif lo from SERVER ipproto tcp sport PORT lookup
//!   TABLE`. The server's replies to a client's address would otherwise be
//!   routed out towards the client; this sends them, and only the packets
//!   this host itself sends from that address and port, to the proxy's
//!   socket. (Remote clients can then no longer reach that server port
//!   directly: its replies to them are delivered here too, and the
//!   reverse-path check refuses their packets.)
//!
//! Both families get the same rules; each carries protocol 244, like our
//! routes, so that a crashed daemon's are found (`routes::remove_leftovers`).

use std::{fmt, net::SocketAddr, str::FromStr};

use rtnetlink::{
    Handle, IpVersion,
    packet_route::{
        IpProtocol,
        route::{RouteMessage, RouteProtocol},
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage, RulePortRange},
    },
};

use super::routes::{
    self, ROUTE_PROTOCOL, RouteError, connect, delete_each, delete_route, delete_rule, local_route,
};

/// Priority of our routing rules: before `lookup main` (32766) and the
/// defaults an operator usually adds at 1000 and up.
pub const RULE_PRIORITY: u32 = 244;

/// The packet mark `classify` sets: `value` in the bits of `mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

/// `0x4c340000/0xffff0000`: "L4" in the high half, clear of the low bits
/// that kube-proxy, Cilium and Istio use.
pub const DEFAULT_MARK: Mark = Mark {
    value: 0x4c34_0000,
    mask: 0xffff_0000,
};

/// The routing table of "deliver here".
pub const DEFAULT_TABLE: u32 = 244;

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// `VALUE` or `VALUE/MASK`, each decimal or `0x` hexadecimal; the value must
/// be non-zero and within the mask.
impl FromStr for Mark {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let number = |part: &str| {
            let parsed = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => part.parse(),
            };
            parsed.map_err(|_| format!("not a 32-bit number: {part:?}"))
        };
        let (value, mask) = match text.split_once('/') {
            Some((value, mask)) => (number(value)?, number(mask)?),
            None => (number(text)?, u32::MAX),
        };
        if value == 0 {
            return Err("the mark must not be 0: unmarked packets have mark 0".to_owned());
        }
        if value & !mask != 0 {
            return Err(format!("mark {value:#x} has bits outside mask {mask:#x}"));
        }
        Ok(Mark { value, mask })
    }
}

/// Another program's routing rule on a packet mark, as far as the conflict
/// check looks at it.
#[derive(Clone, Copy, Debug)]
pub struct MarkRule {
    pub value: u32,
    /// `u32::MAX` where the rule gives none: the whole mark is compared.
    pub mask: u32,
    /// `not fwmark ...`.
    pub inverted: bool,
    pub priority: u32,
}

impl Mark {
    /// Whether `rule` and this daemon's rule (at priority `ours`) would take
    /// each other's packets: one that comes first (a lower priority; at the
    /// same one, either) takes the other's marked packets, each seen with
    /// its own mark's bits only. kube-proxy's and Cilium's low bits, or
    /// Calico's `not fwmark 0x100000/0x100000` (which our mark satisfies),
    /// share nothing with it.
    pub fn conflicts(self, rule: MarkRule, ours: u32) -> bool {
        let takes = |value: u32, mask: u32, inverted: bool, packet: u32| {
            (packet & mask == value) != inverted
        };
        let theirs_first =
            rule.priority <= ours && takes(rule.value, rule.mask, rule.inverted, self.value);
        let ours_first = rule.priority >= ours
            && !rule.inverted
            && takes(self.value, self.mask, false, rule.value);
        theirs_first || ours_first
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(
        "routing table {table} already has {count} route(s) l4proxy did not make; choose another with --routing-table"
    )]
    TableInUse { table: u32, count: usize },
    #[error(
        "a routing rule already uses fwmark {mark:#x} (ip rule: {rule}); choose another with --fwmark"
    )]
    MarkInUse { mark: u32, rule: String },
    #[error(
        "routing table {table} is looked up by a routing rule l4proxy did not add (ip rule: {rule}): its packets would be delivered to this host; choose another with --routing-table"
    )]
    TableLookedUp { table: u32, rule: String },
}

/// The rules and routes this daemon added, set by [`Delivery::set`] and
/// removed again by [`Delivery::remove`].
pub struct Delivery {
    handle: Handle,
    mark: Mark,
    table: u32,
    /// The fwmark rules and the table's routes, when installed.
    base: Option<Base>,
    /// The rule for each server on this host, by server.
    servers: Vec<(SocketAddr, RuleMessage)>,
}

struct Base {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
}

impl Delivery {
    /// Nothing installed yet.
    pub fn new(mark: Mark, table: u32) -> Result<Delivery, DeliveryError> {
        Ok(Delivery {
            handle: connect()?,
            mark,
            table,
            base: None,
            servers: Vec::new(),
        })
    }

    /// With `needed`, installs the fwmark rule and the table's `local
    /// default` routes (refusing a table or mark someone else already uses),
    /// and makes the server rules those of `local_servers`; without, removes
    /// them all. Changes only what differs from what is installed.
    pub async fn set(
        &mut self,
        needed: bool,
        local_servers: &[SocketAddr],
    ) -> Result<(), DeliveryError> {
        let local_servers = if needed { local_servers } else { &[] };
        if needed && self.base.is_none() {
            check_unused(&self.handle, self.mark, self.table).await?;
            self.base = Some(self.add_base().await?);
        }
        let (kept, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut self.servers)
            .into_iter()
            .partition(|(server, _)| local_servers.contains(server));
        // A stale rule that cannot be removed stays on the list.
        let (left, mut first_error) = delete_each(stale, async |(_, rule)| {
            delete_rule(&self.handle, rule).await
        })
        .await;
        self.servers = kept;
        self.servers.extend(left);
        for &server in local_servers {
            if self.servers.iter().any(|(known, _)| *known == server) {
                continue;
            }
            let rule = self.add_server_rule(server).await?;
            self.servers.push((server, rule));
        }
        if !needed && let Some(base) = self.base.take() {
            let (left, error) = self.delete_base(base).await;
            first_error = first_error.or(error);
            if !(left.rules.is_empty() && left.routes.is_empty()) {
                self.base = Some(left);
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// The table's routes and the fwmark rules; on an error, what was added
    /// is removed again.
    async fn add_base(&self) -> Result<Base, RouteError> {
        // Read once: the routes are made for these, and errors name them.
        let versions = routes::ip_versions();
        let wanted = self.base_messages(versions);
        let mut base = Base {
            rules: Vec::new(),
            routes: Vec::new(),
        };
        let added = async {
            for (version, route) in versions.iter().zip(wanted.routes) {
                self.handle
                    .route()
                    .add(route.clone())
                    .execute()
                    .await
                    .map_err(|source| RouteError::Add {
                        prefix: default_route(version),
                        source,
                    })?;
                base.routes.push(route);
            }
            for rule in wanted.rules {
                let description = format!("fwmark {} lookup {}", self.mark, self.table);
                self.add_rule(rule.clone(), description).await?;
                base.rules.push(rule);
            }
            Ok::<(), RouteError>(())
        }
        .await;
        if let Err(e) = added {
            if let (_, Some(undo)) = self.delete_base(base).await {
                tracing::warn!(error = %undo, "removing the rules and routes of a failed start");
            }
            return Err(e);
        }
        Ok(base)
    }

    /// `local default dev lo table TABLE` and `fwmark MARK lookup TABLE`,
    /// each of `versions` (the IP versions this host routes,
    /// [`routes::ip_versions`]).
    fn base_messages(&self, versions: &[IpVersion]) -> Base {
        let routes = versions
            .iter()
            .map(|version| local_route(default_route(version), self.table))
            .collect();
        let rules = versions
            .iter()
            .map(|version| {
                let mut rule = rule(version.clone(), self.table);
                rule.attributes.push(RuleAttribute::FwMark(self.mark.value));
                rule.attributes.push(RuleAttribute::FwMask(self.mark.mask));
                rule
            })
            .collect();
        Base { rules, routes }
    }

    /// Whether the fwmark rules and the table's routes are installed.
    pub fn installed(&self) -> bool {
        self.base.is_some()
    }

    /// The servers on this host that have a rule.
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|(server, _)| *server).collect()
    }

    /// Takes as its own what a predecessor installed (a takeover): the
    /// fwmark rules and the table's routes if `base`, and the rules of
    /// `servers`; this daemon removes them from now on when unwanted.
    pub fn adopt(&mut self, base: bool, servers: &[SocketAddr]) {
        if base && self.base.is_none() {
            self.base = Some(self.base_messages(routes::ip_versions()));
        }
        for &server in servers {
            if !self.servers.iter().any(|(known, _)| *known == server) {
                self.servers.push((server, server_rule(server, self.table)));
            }
        }
    }

    /// Forgets what [`Delivery::adopt`] would take: it stays, for whoever
    /// owns it now (a successor, or a predecessor whose takeover failed).
    pub fn disown(&mut self, base: bool, servers: &[SocketAddr]) {
        if base {
            self.base = None;
        }
        self.servers.retain(|(server, _)| !servers.contains(server));
    }

    /// Whether `route` is one of the table's routes it installed.
    pub fn keeps_route(&self, route: &RouteMessage) -> bool {
        let key = routes::route_key(route);
        key.is_some()
            && self
                .base
                .iter()
                .flat_map(|base| &base.routes)
                .any(|ours| routes::route_key(ours) == key)
    }

    /// Whether `rule` is one of the rules it installed.
    pub fn keeps_rule(&self, rule: &RuleMessage) -> bool {
        let base = self.base.iter().flat_map(|base| &base.rules);
        let servers = self.servers.iter().map(|(_, rule)| rule);
        base.chain(servers).any(|ours| same_rule(ours, rule))
    }

    /// Deletes the fwmark rules and the table's routes, trying all; returns
    /// what is left, and the first error.
    async fn delete_base(&self, base: Base) -> (Base, Option<RouteError>) {
        let (rules, rules_error) = delete_each(base.rules, async |rule| {
            delete_rule(&self.handle, rule).await
        })
        .await;
        let (routes, routes_error) = delete_each(base.routes, async |route| {
            delete_route(&self.handle, route).await
        })
        .await;
        (Base { rules, routes }, rules_error.or(routes_error))
    }

    /// `ip rule add iif lo from SERVER ipproto tcp sport PORT lookup TABLE`.
    async fn add_server_rule(&self, server: SocketAddr) -> Result<RuleMessage, RouteError> {
        let rule = server_rule(server, self.table);
        let description = format!(
            "iif lo from {} ipproto tcp sport {} lookup {}",
            server.ip(),
            server.port(),
            self.table
        );
        self.add_rule(rule.clone(), description).await?;
        Ok(rule)
    }

    async fn add_rule(&self, rule: RuleMessage, description: String) -> Result<(), RouteError> {
        let mut request = self.handle.rule().add();
        *request.message_mut() = rule;
        request
            .execute()
            .await
            .map_err(|source| RouteError::AddRule {
                rule: description,
                source,
            })
    }

    /// Removes everything it added.
    pub async fn remove(&mut self) -> Result<(), DeliveryError> {
        self.set(false, &[]).await
    }
}

/// Whether two rules match the same packets into the same table, as the
/// kernel lists them (it adds attributes of its own, in its own order; a
/// rule has each attribute once).
fn same_rule(a: &RuleMessage, b: &RuleMessage) -> bool {
    let matching = |rule: &RuleMessage| -> Vec<RuleAttribute> {
        rule.attributes
            .iter()
            .filter(|attribute| {
                matches!(
                    attribute,
                    RuleAttribute::Table(_)
                        | RuleAttribute::FwMark(_)
                        | RuleAttribute::FwMask(_)
                        | RuleAttribute::Source(_)
                        | RuleAttribute::Iifname(_)
                        | RuleAttribute::IpProtocol(_)
                        | RuleAttribute::SourcePortRange(_)
                )
            })
            .cloned()
            .collect()
    };
    let (ours, theirs) = (matching(a), matching(b));
    a.header.family == b.header.family
        && a.header.src_len == b.header.src_len
        && ours.len() == theirs.len()
        && ours.iter().all(|attribute| theirs.contains(attribute))
}

/// The routing rule of a server on this host (see the module's header).
fn server_rule(server: SocketAddr, table: u32) -> RuleMessage {
    let version = if server.is_ipv4() {
        IpVersion::V4
    } else {
        IpVersion::V6
    };
    let mut rule = rule(version, table);
    rule.header.src_len = if server.is_ipv4() { 32 } else { 128 };
    rule.attributes.extend([
        RuleAttribute::Source(server.ip()),
        RuleAttribute::Iifname("lo".to_owned()),
        RuleAttribute::IpProtocol(IpProtocol::Tcp),
        RuleAttribute::SourcePortRange(RulePortRange {
            start: server.port(),
            end: server.port(),
        }),
    ]);
    rule
}

/// `ip rule add lookup TABLE pref 244 proto 244` (matching on nothing yet).
fn rule(version: IpVersion, table: u32) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = routes::family_of(&version);
    rule.header.action = RuleAction::ToTable;
    rule.attributes.extend([
        RuleAttribute::Table(table),
        RuleAttribute::Priority(RULE_PRIORITY),
        RuleAttribute::Protocol(RouteProtocol::Other(ROUTE_PROTOCOL)),
    ]);
    rule
}

/// `0.0.0.0/0` or `::/0`.
fn default_route(version: &IpVersion) -> ipnet::IpNet {
    match version {
        IpVersion::V4 => "0.0.0.0/0",
        IpVersion::V6 => "::/0",
    }
    .parse()
    .expect("a valid prefix")
}

/// Another program's routes in our table, its rule on our mark, or its rule
/// that looks our table up (`default`, 253, is looked up by the kernel's
/// own last rule) would mix with ours: refuse to start rather than
/// misroute.
async fn check_unused(handle: &Handle, mark: Mark, table: u32) -> Result<(), DeliveryError> {
    let versions = routes::ip_versions();
    let mut count = 0;
    for family in versions.iter().map(routes::family_of) {
        count += routes::routes(handle, family)
            .await?
            .iter()
            .filter(|route| routes::table_of(route) == table)
            .count();
    }
    if count > 0 {
        return Err(DeliveryError::TableInUse { table, count });
    }
    for version in versions {
        for rule in routes::rules(handle, version.clone()).await? {
            let number =
                |pick: fn(&RuleAttribute) -> Option<u32>| rule.attributes.iter().find_map(pick);
            // Tables above 255 are only in the attribute.
            let looked_up = number(|a| match a {
                RuleAttribute::Table(table) => Some(*table),
                _ => None,
            })
            .unwrap_or(u32::from(rule.header.table));
            if looked_up == table && !routes::is_ours(&rule) {
                return Err(DeliveryError::TableLookedUp {
                    table,
                    rule: format!("{:?}", rule.attributes),
                });
            }
            let value = number(|a| match a {
                RuleAttribute::FwMark(value) => Some(*value),
                _ => None,
            });
            // Without a mask, `ip rule` compares the whole mark.
            let mask = number(|a| match a {
                RuleAttribute::FwMask(mask) => Some(*mask),
                _ => None,
            });
            // The kernel leaves out priority 0.
            let priority = number(|a| match a {
                RuleAttribute::Priority(priority) => Some(*priority),
                _ => None,
            });
            if let Some(value) = value
                && mark.conflicts(
                    MarkRule {
                        value,
                        mask: mask.unwrap_or(u32::MAX),
                        inverted: rule.header.flags.contains(RuleFlags::Invert),
                        priority: priority.unwrap_or(0),
                    },
                    RULE_PRIORITY,
                )
            {
                return Err(DeliveryError::MarkInUse {
                    mark: mark.value,
                    rule: format!("{:?}", rule.attributes),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rule as the kernel lists it (its own attributes added, in its own
    /// order) is the one made; another server's, or another table's, is not.
    #[test]
    fn a_listed_rule_is_told_by_what_it_matches() {
        let server: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        let made = server_rule(server, DEFAULT_TABLE);
        let mut listed = made.clone();
        listed.attributes.reverse();
        listed
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        assert!(same_rule(&made, &listed));
        let other: SocketAddr = "192.0.2.1:8081".parse().unwrap();
        assert!(!same_rule(&server_rule(other, DEFAULT_TABLE), &listed));
        assert!(!same_rule(&server_rule(server, 245), &listed));
        let base = |table| {
            let mut rule = rule(IpVersion::V4, table);
            rule.attributes
                .push(RuleAttribute::FwMark(DEFAULT_MARK.value));
            rule.attributes
                .push(RuleAttribute::FwMask(DEFAULT_MARK.mask));
            rule
        };
        assert!(same_rule(&base(DEFAULT_TABLE), &base(DEFAULT_TABLE)));
        assert!(!same_rule(&base(DEFAULT_TABLE), &made));
    }

    /// A rule before ours takes our marked packets if our mark satisfies
    /// it; ours, first, takes a later rule's packets if theirs satisfies
    /// ours.
    #[test]
    fn a_rule_conflicts_when_one_of_the_two_would_take_the_others_packets() {
        let ours = DEFAULT_MARK;
        let rule = |value, mask, inverted, priority| MarkRule {
            value,
            mask,
            inverted,
            priority,
        };
        for (other, conflicts) in [
            // Before ours, on our whole mark, or its top byte only.
            (rule(0x4c34_0000, u32::MAX, false, 100), true),
            (rule(0x4c00_0000, 0xff00_0000, false, 100), true),
            // The same after ours: what it would take, ours took first;
            // its own packets (0x4c000000) are not ours.
            (rule(0x4c00_0000, 0xff00_0000, false, 300), false),
            // After ours, on a mark ours takes.
            (rule(0x4c34_0001, u32::MAX, false, 300), true),
            (rule(0x4c35_0000, u32::MAX, false, 100), false),
            // kube-proxy's bit, Cilium's nibble: bits we leave alone.
            (rule(0x4000, 0x4000, false, 100), false),
            (rule(0x0c00, 0x0f00, false, 100), false),
            // Calico's `not fwmark 0x100000/0x100000` before ours: our mark
            // has that bit, so the rule does not take our packets.
            (rule(0x10_0000, 0x10_0000, true, 99), false),
            // A `not` rule that our mark does not satisfy takes them all.
            (rule(0x1, 0x1, true, 99), true),
        ] {
            assert_eq!(ours.conflicts(other, RULE_PRIORITY), conflicts, "{other:?}");
        }
    }
}
