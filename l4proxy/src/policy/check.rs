//! Raw → checked: resolves rule and upstream names, then runs the checks that
//! span several fields. These errors carry the JSON path only: serde is done
//! with the text by then.

use std::net::{IpAddr, SocketAddr};

use foldhash::HashMap;

use ipnet::IpNet;
use l4proxy_common::{MAX_INTERFACE_RULES, MAX_RULE_ENTRIES, MAX_UPSTREAM_SERVERS};

use super::{
    Action, Bind, Conditions, ConnectFront, InterceptRule, Parent, Policy, PolicyError, PortSpec,
    Route, RuleId, Target, Terminate, Upstream, UpstreamId,
    connect::{RawConnectFront, covers_a_family},
    enclosing::Enclosing,
    raw,
};
use crate::{intercept::rules, proxy_protocol, route};

pub(super) fn check(raw: raw::Policy) -> Result<Policy, PolicyError> {
    // BTreeMap order: upstreams sorted by name, so they can be found by binary search.
    let upstreams: Vec<Upstream> = raw
        .upstreams
        .into_iter()
        .map(|(name, upstream)| Upstream {
            name,
            target: match upstream.target {
                raw::Target::Servers(servers) => {
                    Target::Servers(servers.into_iter().map(|s| s.0).collect())
                }
                raw::Target::OriginalDestination => Target::OriginalDestination,
                raw::Target::Parent(parent) => Target::Parent(parent),
            },
            bind: upstream.bind,
            proxy_protocol: upstream.proxy_protocol.map(|version| match version {
                raw::ProxyVersion::V1 => proxy_protocol::Version::V1,
                raw::ProxyVersion::V2 => proxy_protocol::Version::V2,
            }),
            tls: upstream.tls,
            balancing: upstream.balancing,
        })
        .collect();
    let rules = check_rules(raw.intercept, &upstreams)?;
    let routes = check_routes(raw.routes, &rules, &upstreams)?;

    let policy = Policy {
        rules,
        routes,
        upstreams,
    };
    check_overlaps(&policy)?;
    check_gateway_overlaps(&policy)?;
    check_connect_listeners(&policy)?;
    super::tls_checks::check(&policy)?;
    check_size(&policy)?;
    check_loops(&policy)?;
    check_repeated_servers(&policy)?;
    // Each upstream's own `bind`, whether or not a route overrides it, then
    // each way connections reach an upstream, with the `bind` in force there.
    let own = (0..policy.upstreams.len()).map(|u| BindTarget {
        upstream: UpstreamId(u),
        bind: policy.upstreams[u].bind,
        route: None,
        path: format!("upstreams.{}", policy.upstreams[u].name),
        rules: Vec::new(),
    });
    for target in own.chain(policy.bind_targets()) {
        check_original_destination(&policy, &target)?;
        check_bind_family(&policy, &target)?;
    }
    Ok(policy)
}

fn check_rules(
    raw: Vec<raw::Object<raw::Rule>>,
    upstreams: &[Upstream],
) -> Result<Vec<InterceptRule>, PolicyError> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::default();
    for (i, raw::Object(rule)) in raw.into_iter().enumerate() {
        if let Some(first) = names.insert(rule.name.0.clone(), i) {
            return Err(PolicyError::at(
                format!("intercept[{i}].name"),
                format!(
                    "duplicate rule name {:?} (also intercept[{first}])",
                    rule.name.0
                ),
            ));
        }
        let upstream = rule
            .upstream
            .map(|name| find_upstream(upstreams, &name, || format!("intercept[{i}].upstream")))
            .transpose()?;
        let gateway = rule.interfaces.is_some();
        let (prefixes, ports, connect) =
            front_of(rule.prefixes, rule.ports, rule.connect, gateway, i)?;
        let interfaces: Vec<String> = rule
            .interfaces
            .map(|names| names.into_iter().map(|i| i.0).collect())
            .unwrap_or_default();
        for (field, repeat) in [
            ("prefixes", repeated(&prefixes)),
            ("ports", repeated(&ports)),
            ("interfaces", repeated(&interfaces)),
        ] {
            if let Some((k, first)) = repeat {
                return Err(PolicyError::at(
                    format!("intercept[{i}].{field}[{k}]"),
                    format!("repeats intercept[{i}].{field}[{first}]: list each once"),
                ));
            }
        }
        rules.push(InterceptRule {
            name: rule.name.0,
            prefixes,
            ports,
            upstream,
            interfaces,
            accept_proxy_from: rule
                .accept_proxy_protocol
                .map(|raw::Object(accept)| accept.from.into_iter().map(|p| p.0).collect())
                .unwrap_or_default(),
            timeouts: rule.timeouts.map(|t| t.0).unwrap_or_default(),
            keepalive: rule.keepalive,
            limits: rule.limits.map(|l| l.0).unwrap_or_default(),
            connect,
            terminate: rule.terminate.map(Terminate::from),
        });
    }
    Ok(rules)
}

/// The first item of a list that an earlier one equals: its place and the
/// earlier one's.
fn repeated<T: Eq + std::hash::Hash>(items: &[T]) -> Option<(usize, usize)> {
    let mut first: HashMap<&T, usize> = HashMap::default();
    items
        .iter()
        .enumerate()
        .find_map(|(k, item)| first.insert(item, k).map(|earlier| (k, earlier)))
}

/// How a rule takes its connections: the prefixes and ports the kernel
/// steers, or a CONNECT front end.
type Front = (Vec<IpNet>, Vec<PortSpec>, Option<ConnectFront>);

/// A rule takes connections one way: steered by destination (`prefixes`
/// and `ports`, and `interfaces` on a gateway), or on its own listeners
/// (`connect`).
fn front_of(
    prefixes: Option<Vec<raw::Prefix>>,
    ports: Option<Vec<raw::Port>>,
    connect: Option<raw::Object<RawConnectFront>>,
    gateway: bool,
    i: usize,
) -> Result<Front, PolicyError> {
    match (prefixes, ports, connect) {
        (Some(prefixes), Some(ports), None) => {
            let prefixes: Vec<IpNet> = prefixes.into_iter().map(|p| p.0).collect();
            // A rule without interfaces makes its prefixes this host's own
            // (a local route each): all of a family's addresses would leave
            // the host no other destination in it.
            if !gateway
                && let Some(family) = [("IPv4", true), ("IPv6", false)]
                    .into_iter()
                    .find_map(|(family, v4)| covers_a_family(&prefixes, v4).then_some(family))
            {
                return Err(PolicyError::at(
                    format!("intercept[{i}].prefixes"),
                    format!(
                        "hold every {family} address: on a rule without \"interfaces\" they \
                         would all be this host's own, and the host could reach no other; name \
                         the prefixes this host serves, or list \"interfaces\" to intercept what \
                         a gateway forwards"
                    ),
                ));
            }
            Ok((prefixes, ports.into_iter().map(|p| p.0).collect(), None))
        }
        (None, None, Some(connect)) => {
            if gateway {
                return Err(PolicyError::at(
                    format!("intercept[{i}].interfaces"),
                    "a \"connect\" rule takes connections on its listeners, not on interfaces",
                ));
            }
            let front = ConnectFront::from(connect);
            if front.is_open_relay() {
                return Err(PolicyError::at(
                    format!("intercept[{i}].connect"),
                    "would be an open relay: restrict \"clients\", or the destinations \
                     (\"names\" or \"destinations\")",
                ));
            }
            if let Some(k) = front.listen.iter().position(|a| a.ip().is_unspecified()) {
                return Err(PolicyError::at(
                    format!("intercept[{i}].connect.listen[{k}]"),
                    "an unspecified address listens on all of them: name the address \
                     clients connect to",
                ));
            }
            Ok((Vec::new(), Vec::new(), Some(front)))
        }
        (_, _, Some(_)) => Err(PolicyError::at(
            format!("intercept[{i}]"),
            "a rule takes \"prefixes\" and \"ports\" (steered connections) or \"connect\" \
             (a CONNECT listener), not both",
        )),
        (None, _, None) => Err(PolicyError::at(
            format!("intercept[{i}]"),
            "missing field `prefixes` (or `connect` for a CONNECT listener)",
        )),
        (Some(_), None, None) => Err(PolicyError::at(
            format!("intercept[{i}]"),
            "missing field `ports`",
        )),
    }
}

/// `routes[N]`, `default`, `none`: the labels logs and metrics give a
/// route without a name, a rule's default upstream and no route.
fn is_generated_route_label(name: &str) -> bool {
    let unnamed = name
        .strip_prefix("routes[")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()));
    unnamed || name == "default" || name == "none"
}

fn check_routes(
    raw: Vec<raw::Route>,
    rules: &[InterceptRule],
    upstreams: &[Upstream],
) -> Result<Vec<Route>, PolicyError> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::default();
    for (i, route) in raw.into_iter().enumerate() {
        let name = route.name.map(|name| name.0);
        if let Some(name) = &name
            && is_generated_route_label(name)
        {
            return Err(PolicyError::at(
                format!("routes[{i}].name"),
                format!(
                    "{name:?} is how logs and metrics name an unnamed route, a rule's default \
                     upstream (\"default\") or no route (\"none\"): choose another"
                ),
            ));
        }
        if let Some(name) = &name
            && let Some(first) = names.insert(name.clone(), i)
        {
            return Err(PolicyError::at(
                format!("routes[{i}].name"),
                format!("duplicate route name {name:?} (also routes[{first}])"),
            ));
        }
        let intercept = route
            .conditions
            .intercept
            .map(|names| {
                names
                    .iter()
                    .enumerate()
                    .map(|(k, name)| find_rule(rules, &name.0, i, k))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let action = match route.action {
            raw::Action::Upstream(name) => {
                Action::Upstream(find_upstream(upstreams, &name, || {
                    format!("routes[{i}].upstream")
                })?)
            }
            raw::Action::Reject => Action::Reject,
        };
        let raw::Conditions {
            destination,
            ports,
            source,
            target,
            hello,
            ..
        } = route.conditions;
        routes.push(Route {
            name,
            conditions: Conditions {
                intercept,
                destination: destination
                    .map(|prefixes| prefixes.into_iter().map(|p| p.0).collect()),
                ports: ports.map(|ports| ports.into_iter().map(|p| p.0).collect()),
                source: source.map(|prefixes| prefixes.into_iter().map(|p| p.0).collect()),
                target,
                hello,
            },
            action,
            bind: route.bind,
            timeouts: route.timeouts,
            terminate: route.terminate,
        });
    }
    Ok(routes)
}

fn find_rule(
    rules: &[InterceptRule],
    name: &str,
    route: usize,
    k: usize,
) -> Result<RuleId, PolicyError> {
    rules
        .iter()
        .position(|rule| rule.name == name)
        .map(RuleId)
        .ok_or_else(|| {
            let known: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            PolicyError::at(
                format!("routes[{route}].match.intercept[{k}]"),
                format!(
                    "no intercept rule named {name:?}; known: {}",
                    known.join(", ")
                ),
            )
        })
}

fn find_upstream(
    upstreams: &[Upstream],
    name: &str,
    path: impl FnOnce() -> String,
) -> Result<UpstreamId, PolicyError> {
    upstreams
        .binary_search_by(|u| u.name.as_str().cmp(name))
        .map(UpstreamId)
        .map_err(|_| {
            let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            PolicyError::at(
                path(),
                format!("no upstream named {name:?}; known: {known}"),
            )
        })
}

/// Two rules that match the same destination with equal precedence would leave
/// the choice to their order in the file; make the operator say which wins.
fn check_overlaps(policy: &Policy) -> Result<(), PolicyError> {
    let mut claims: HashMap<IpNet, Vec<(usize, PortSpec)>> = HashMap::default();
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in &rule.prefixes {
            let earlier = claims.entry(*prefix).or_default();
            for &ports in &rule.ports {
                let precedence = route::specificity(prefix, ports);
                let tie = earlier.iter().find_map(|&(j, other)| {
                    let overlap = ports.intersection(other)?;
                    (j != i && route::specificity(prefix, other) == precedence)
                        .then_some((j, overlap))
                });
                if let Some((j, overlap)) = tie {
                    return Err(PolicyError::at(
                        format!("intercept[{i}]"),
                        format!(
                            "overlaps intercept[{j}] ({:?}) on {prefix} {overlap} with equal precedence",
                            policy.rules[j].name
                        ),
                    ));
                }
                earlier.push((i, ports));
            }
        }
    }
    Ok(())
}

/// The kernel takes a connection by the most specific rule for its
/// destination, whatever interface it came in on, and a gateway rule takes
/// only connections this host forwards. So a gateway rule within a rule
/// without interfaces (whose prefixes become this host's addresses) would
/// take nothing, and a gateway rule more specific than another must list
/// every interface of that one: the other's connections on an interface it
/// lacks would be forwarded untouched.
fn check_gateway_overlaps(policy: &Policy) -> Result<(), PolicyError> {
    // Rules listing the same interfaces never conflict (whichever is more
    // specific lists all of the other's): rules are grouped by their list,
    // so that many rules on one prefix are not compared pair by pair.
    let mut lists: Vec<Vec<&str>> = Vec::new();
    let list_of: Vec<usize> = policy
        .rules
        .iter()
        .map(|rule| {
            let mut names: Vec<&str> = rule.interfaces.iter().map(String::as_str).collect();
            names.sort_unstable();
            names.dedup();
            lists.iter().position(|l| *l == names).unwrap_or_else(|| {
                lists.push(names);
                lists.len() - 1
            })
        })
        .collect();
    // Each prefix with the rules that name it, by interface list.
    let mut named: Enclosing<Vec<(usize, Vec<usize>)>> = Enclosing::new();
    for (i, rule) in policy.rules.iter().enumerate() {
        for prefix in &rule.prefixes {
            let groups = named.entry(*prefix);
            match groups.iter_mut().find(|(list, _)| *list == list_of[i]) {
                Some((_, rules)) => rules.push(i),
                None => groups.push((list_of[i], vec![i])),
            }
        }
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        if !rule.is_gateway() {
            continue;
        }
        for (k, prefix) in rule.prefixes.iter().enumerate() {
            for (outer, groups) in named.of(prefix) {
                for (_, rules) in groups.iter().filter(|(list, _)| *list != list_of[i]) {
                    for &j in rules {
                        let other = &policy.rules[j];
                        if !other.is_gateway() {
                            return Err(PolicyError::at(
                                format!("intercept[{i}].prefixes[{k}]"),
                                format!(
                                    "{prefix} is within {outer} of intercept[{j}] ({:?}), a \
                                     rule without interfaces: its prefixes are this host's \
                                     addresses, and a gateway rule takes only connections \
                                     this host forwards",
                                    other.name
                                ),
                            ));
                        }
                        check_gateway_pair(policy, (i, *prefix), (j, outer))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Gateway rules `a` and `b` on prefixes `a_net` within `b_net`: on every
/// port both take, the more specific one lists every interface of the other.
fn check_gateway_pair(
    policy: &Policy,
    (a, a_net): (usize, IpNet),
    (b, b_net): (usize, IpNet),
) -> Result<(), PolicyError> {
    for &a_ports in &policy.rules[a].ports {
        for &b_ports in &policy.rules[b].ports {
            let Some(overlap) = a_ports.intersection(b_ports) else {
                continue;
            };
            let ((narrow, narrow_net), (wide, wide_net)) = match route::specificity(&a_net, a_ports)
                .cmp(&route::specificity(&b_net, b_ports))
            {
                std::cmp::Ordering::Greater => ((a, a_net), (b, b_net)),
                std::cmp::Ordering::Less => ((b, b_net), (a, a_net)),
                // Equal precedence is `check_overlaps`' to refuse.
                std::cmp::Ordering::Equal => continue,
            };
            let (narrow_rule, wide_rule) = (&policy.rules[narrow], &policy.rules[wide]);
            if let Some(missing) = wide_rule
                .interfaces
                .iter()
                .find(|name| !narrow_rule.interfaces.contains(name))
            {
                return Err(PolicyError::at(
                    format!("intercept[{narrow}].interfaces"),
                    format!(
                        "on {narrow_net} {overlap} this rule is more specific than intercept[{wide}] \
                         ({:?}, {wide_net}) and takes their connections, but only on its own \
                         interfaces: those arriving on {missing:?}, which intercept[{wide}] lists, \
                         would be forwarded untouched; list {missing:?} here too, or keep the \
                         prefixes apart",
                        wide_rule.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A CONNECT listener must be one rule's, reachable (not an address and
/// port the kernel steers to another rule), not one of an upstream's
/// servers, pool or parent (an endless chain), and it reads CONNECT heads,
/// not PROXY headers.
fn check_connect_listeners(policy: &Policy) -> Result<(), PolicyError> {
    let mut seen: HashMap<SocketAddr, usize> = HashMap::default();
    for (i, rule) in policy.rules.iter().enumerate() {
        let Some(front) = &rule.connect else { continue };
        if !rule.accept_proxy_from.is_empty() {
            return Err(PolicyError::at(
                format!("intercept[{i}].accept_proxy_protocol"),
                "a \"connect\" rule reads CONNECT requests, not PROXY protocol headers",
            ));
        }
        for (k, &addr) in front.listen.iter().enumerate() {
            let at = format!("intercept[{i}].connect.listen[{k}]");
            if let Some(first) = seen.insert(addr, i) {
                return Err(PolicyError::at(
                    at,
                    format!("{addr} is also a listener of intercept[{first}]"),
                ));
            }
            if let Some(RuleId(r)) = route::match_rule(policy, addr)
                && !policy.rules[r].is_gateway()
            {
                return Err(PolicyError::at(
                    at,
                    format!(
                        "{addr} is intercepted by rule {:?} (intercept[{r}]): its connections \
                         would be steered there, never to this listener",
                        policy.rules[r].name
                    ),
                ));
            }
        }
    }
    // A pool server there too: relayed to the listener, a client would
    // speak CONNECT to it as this host, inside its `clients` or not, and
    // could name the listener again.
    for upstream in &policy.upstreams {
        if let Some(k) = upstream.servers().iter().position(|s| seen.contains_key(s)) {
            return Err(PolicyError::at(
                upstream.server_path(k),
                "is one of this policy's CONNECT listeners: the chain would never end",
            ));
        }
    }
    Ok(())
}

/// A server listed twice in one pool would share one health state and load
/// count, and a retry could go back to it ("each server at most once").
fn check_repeated_servers(policy: &Policy) -> Result<(), PolicyError> {
    for upstream in &policy.upstreams {
        let servers = upstream.servers();
        if let Some((k, j)) = repeated(servers) {
            return Err(PolicyError::at(
                upstream.server_path(k),
                format!(
                    "{} is listed already ([{j}]): give it a \"weight\" instead",
                    servers[k]
                ),
            ));
        }
    }
    Ok(())
}

/// The proxy's own connection to an address a rule makes local would be
/// steered back into the proxy. Every upstream is checked, whether a rule or a
/// route names it. A gateway rule takes only connections arriving on its
/// interfaces, which the proxy's own never do (they leave through them, or
/// arrive on loopback): its servers may lie in a gateway rule's prefixes.
fn check_loops(policy: &Policy) -> Result<(), PolicyError> {
    for upstream in &policy.upstreams {
        for (k, &server) in upstream.servers().iter().enumerate() {
            if server.ip().is_unspecified() {
                return Err(PolicyError::at(
                    upstream.server_path(k),
                    format!(
                        "{server} is unspecified: a connection to it reaches this host itself; name the server's address"
                    ),
                ));
            }
            if let Some(RuleId(r)) = route::match_rule(policy, server)
                && !policy.rules[r].is_gateway()
            {
                return Err(PolicyError::at(
                    upstream.server_path(k),
                    format!(
                        "{server} is intercepted by rule {:?} (intercept[{r}]); connecting to it would loop back into the proxy",
                        policy.rules[r].name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The original destination of a rule without `interfaces` is an address
/// this host owns: the proxy's connection to it would be steered back in.
/// And with `bind: client` the connection to it would be the client's own
/// connection turned around: the same four addresses and ports.
fn check_original_destination(policy: &Policy, target: &BindTarget) -> Result<(), PolicyError> {
    let upstream = &policy.upstreams[target.upstream.0];
    if upstream.target != Target::OriginalDestination {
        return Ok(());
    }
    if target.bind == Bind::Client {
        return Err(PolicyError::at(
            target.bind_path(policy),
            format!(
                "\"client\" cannot be used with upstream {:?} (original_destination): a connection \
                 from the client's address and port to its original destination has the four \
                 addresses and ports of the client's own connection; use \"client-ip\"",
                upstream.name
            ),
        ));
    }
    if target.bind.is_client()
        && let Some(&RuleId(r)) = target
            .rules
            .iter()
            .find(|&&r| policy.rules[r.0].connect.is_some())
    {
        return Err(PolicyError::at(
            target.bind_path(policy),
            format!(
                "\"client-ip\" cannot be used with upstream {:?} (original_destination) for \
                 CONNECT rule {:?} (intercept[{r}]): a tunnel's destination can be anywhere, and \
                 the replies to a connection from the client's address are taken for the proxy \
                 only from listed servers and gateway rules' destinations",
                upstream.name, policy.rules[r].name
            ),
        ));
    }
    if let Some(&RuleId(r)) = target.rules.iter().find(|&&r| {
        // A CONNECT client names its destination: never this host's
        // unless the front end allows it.
        let rule = &policy.rules[r.0];
        !rule.is_gateway() && rule.connect.is_none()
    }) {
        let whose = if policy.rules[r].accept_proxy_from.is_empty() {
            "its destinations are local to this host, so the connection would come back into \
             the proxy"
        } else {
            "its destinations are what its front proxies announce, which may be anything"
        };
        return Err(PolicyError::at(
            target.path.clone(),
            format!(
                "upstream {:?} sends connections to their original destination, but rule {:?} \
                 (intercept[{r}]) has no \"interfaces\": {whose}{}",
                upstream.name,
                policy.rules[r].name,
                if target.route.is_some() {
                    "; limit the route to gateway rules with \"intercept\""
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

/// A fixed source address must be of the family of every server it is used
/// for (for the original destination: of every prefix the rules intercept).
fn check_bind_family(policy: &Policy, target: &BindTarget) -> Result<(), PolicyError> {
    let Bind::Address(addr) = target.bind else {
        return Ok(());
    };
    let upstream = &policy.upstreams[target.upstream.0];
    // A connection is made in one family, and from loopback only to it.
    let unfit =
        |to: IpAddr| to.is_ipv4() != addr.is_ipv4() || (addr.is_loopback() && !to.is_loopback());
    let mismatch = match &upstream.target {
        Target::Servers(servers) | Target::Parent(Parent { servers, .. }) => servers
            .iter()
            .enumerate()
            .find(|(_, server)| unfit(server.ip()))
            .map(|(k, server)| {
                let what = format!("server {server} ({})", upstream.server_path(k));
                (what, server.ip())
            }),
        Target::OriginalDestination => target
            .destinations(policy)
            .find(|(_, prefix)| unfit(prefix.addr()))
            .map(|(RuleId(r), prefix)| {
                let what = format!(
                    "prefix {prefix} of rule {:?} (intercept[{r}])",
                    policy.rules[r].name
                );
                (what, prefix.addr())
            }),
    };
    let Some((what, to)) = mismatch else {
        return Ok(());
    };
    let (is, why) = match addr {
        _ if to.is_ipv4() == addr.is_ipv4() => {
            ("loopback", "a loopback source reaches only this host")
        }
        IpAddr::V4(_) => ("IPv4", "a connection is made in one family"),
        IpAddr::V6(_) => ("IPv6", "a connection is made in one family"),
    };
    Err(PolicyError::at(
        target.bind_path(policy),
        format!("source address {addr} is {is} but {what} is not: {why}"),
    ))
}

/// One way connections reach an upstream: a rule's default or a route.
pub struct BindTarget {
    pub upstream: UpstreamId,
    /// The source address its connections take.
    pub bind: Bind,
    /// The route that sends them, if not a rule's default.
    pub route: Option<usize>,
    /// JSON path of the upstream reference.
    pub path: String,
    /// The rules whose connections may take this way (an overestimate for
    /// routes, see [`Route::may_apply`]).
    pub rules: Vec<RuleId>,
}

impl BindTarget {
    /// The (rule, prefix) pairs its connections' destinations may be in: the
    /// rules' prefixes, less those a route's `destination` condition leaves
    /// out.
    pub fn destinations<'p>(
        &self,
        policy: &'p Policy,
    ) -> impl Iterator<Item = (RuleId, &'p IpNet)> {
        let wanted = self
            .route
            .and_then(|j| policy.routes[j].conditions.destination.as_deref());
        self.rules.iter().flat_map(move |&id| {
            policy.rules[id.0]
                .prefixes
                .iter()
                .filter(move |prefix| {
                    wanted.is_none_or(|wanted| wanted.iter().any(|w| super::overlap(w, prefix)))
                })
                .map(move |prefix| (id, prefix))
        })
    }

    /// JSON path of the `bind` in force.
    pub(crate) fn bind_path(&self, policy: &Policy) -> String {
        match self.route {
            Some(j) if policy.routes[j].bind.is_some() => format!("routes[{j}].bind"),
            _ => format!("upstreams.{}.bind", policy.upstreams[self.upstream.0].name),
        }
    }
}

impl Policy {
    /// Every way connections reach an upstream, with the source address
    /// they take.
    pub fn bind_targets(&self) -> Vec<BindTarget> {
        let mut targets = Vec::new();
        for (r, rule) in self.rules.iter().enumerate() {
            if let Some(upstream) = rule.upstream {
                targets.push(BindTarget {
                    upstream,
                    bind: self.upstreams[upstream.0].bind,
                    route: None,
                    path: format!("intercept[{r}].upstream"),
                    rules: vec![RuleId(r)],
                });
            }
        }
        for (j, route) in self.routes.iter().enumerate() {
            if let Action::Upstream(upstream) = route.action {
                targets.push(BindTarget {
                    upstream,
                    bind: route.bind.unwrap_or(self.upstreams[upstream.0].bind),
                    route: Some(j),
                    path: format!("routes[{j}].upstream"),
                    rules: (0..self.rules.len())
                        .map(RuleId)
                        .filter(|&id| route.may_apply(id, &self.rules[id.0]))
                        .collect(),
                });
            }
        }
        targets
    }
}

/// The kernel's maps have fixed sizes: the rule map one entry per prefix
/// and port class, the gateway rules' map one per (interface, rule) listed
/// (a bridge adds its ports, known only when the policy is put in force),
/// the upstream servers' map one per server address.
fn check_size(policy: &Policy) -> Result<(), PolicyError> {
    let mut pairs = 0;
    for (i, rule) in policy.rules.iter().enumerate() {
        pairs += rule.interfaces.len();
        if pairs > MAX_INTERFACE_RULES as usize {
            return Err(PolicyError::at(
                format!("intercept[{i}].interfaces"),
                format!(
                    "gateway rules list {pairs} (interface, rule) pairs up to here, more than \
                     the kernel's limit of {MAX_INTERFACE_RULES}"
                ),
            ));
        }
    }
    let servers: std::collections::HashSet<&SocketAddr> = policy
        .upstreams
        .iter()
        .flat_map(|upstream| upstream.servers())
        .collect();
    if servers.len() > MAX_UPSTREAM_SERVERS as usize {
        return Err(PolicyError::at(
            "upstreams",
            format!(
                "{} server addresses, more than the kernel's limit of {MAX_UPSTREAM_SERVERS}",
                servers.len()
            ),
        ));
    }
    let count = rules::entry_count(policy);
    if count > MAX_RULE_ENTRIES as usize {
        return Err(PolicyError::at(
            "intercept",
            format!(
                "compiles to {count} kernel entries, more than the limit of {MAX_RULE_ENTRIES} \
                 (one entry per prefix and port class: ports named by the same specs share a class)"
            ),
        ));
    }
    Ok(())
}
