//! What a policy may say but almost certainly does not mean: routes no
//! connection can reach, rules whose every connection is refused, gateway
//! rules a rule without interfaces takes addresses from, and certificates
//! that expire soon or are for none of their routes' names. Each check is
//! conservative: it warns only when it is sure.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    Conditions, HelloConditions, Policy, PortSpec, RouteId, RuleId, SniCondition, Target,
    check::BindTarget, enclosing::Enclosing,
};

/// What an address condition that is not given holds for.
const EVERY_ADDRESS: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 0)),
];

impl Policy {
    /// One message per finding, each starting with the JSON path it is about.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let every_rule: Vec<RuleId> = (0..self.rules.len()).map(RuleId).collect();
        for (j, route) in self.routes.iter().enumerate() {
            let shadow = self.routes[..j]
                .iter()
                .position(|earlier| covers(&earlier.conditions, &route.conditions, &every_rule));
            if let Some(i) = shadow {
                warnings.push(format!(
                    "routes[{j}]: never matches: {} matches every connection it would",
                    self.route_label(RouteId(i))
                ));
            } else if !self
                .rules
                .iter()
                .enumerate()
                .any(|(r, rule)| route.may_apply(RuleId(r), rule))
            {
                let no_connect_rule = route.conditions.target.is_some()
                    && self.rules.iter().all(|rule| rule.connect.is_none());
                warnings.push(if no_connect_rule {
                    format!(
                        "routes[{j}]: never matches: its \"target\" condition holds only for \
                         CONNECT requests, and no rule is a \"connect\" rule"
                    )
                } else {
                    format!(
                        "routes[{j}]: never matches: no intercept rule steers a connection \
                         that its intercept, destination and ports conditions allow"
                    )
                });
            }
        }
        for (r, rule) in self.rules.iter().enumerate() {
            if rule.upstream.is_none()
                && !self
                    .routes
                    .iter()
                    .any(|route| route.may_apply(RuleId(r), rule))
            {
                warnings.push(format!(
                    "intercept[{r}]: no upstream and no route applies to it: \
                     every connection it steers is refused"
                ));
            }
        }
        warnings.extend(
            self.bind_targets()
                .iter()
                .filter_map(|t| self.missing_family(t)),
        );
        warnings.extend(self.gateways_inside_local_prefixes());
        warnings.extend(super::tls_checks::warnings(self));
        warnings
    }
}

impl Policy {
    /// A rule without interfaces makes its prefixes this host's own, on
    /// every port; a gateway rule takes only connections this host
    /// forwards, so it takes none to an address in them, on any port of
    /// its own: those are this host's, and reset where nothing listens.
    /// (The other way round, a gateway rule inside such a prefix, is an
    /// error: it would take nothing at all.)
    fn gateways_inside_local_prefixes(&self) -> Vec<String> {
        // Each gateway prefix with its first rule.
        let mut gateway: Enclosing<Option<usize>> = Enclosing::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.is_gateway() {
                for prefix in &rule.prefixes {
                    gateway.entry(*prefix).get_or_insert(i);
                }
            }
        }
        let mut warnings = Vec::new();
        for (j, rule) in self.rules.iter().enumerate() {
            if rule.is_gateway() {
                continue;
            }
            for (k, prefix) in rule.prefixes.iter().enumerate() {
                let within = gateway
                    .of(prefix)
                    .find_map(|(outer, &first)| first.map(|i| (outer, i)));
                if let Some((outer, i)) = within {
                    warnings.push(format!(
                        "intercept[{j}].prefixes[{k}]: {prefix} becomes this host's own, and \
                         gateway rule {:?} (intercept[{i}], {outer}) takes only connections \
                         this host forwards: its connections to {prefix} are this host's, \
                         reset where nothing listens",
                        self.rules[i].name
                    ));
                }
            }
        }
        warnings
    }

    /// A connection from the client's address is made in the client's
    /// family: a pool without a server of a family its rules intercept
    /// refuses those clients.
    fn missing_family(&self, target: &BindTarget) -> Option<String> {
        let upstream = &self.upstreams[target.upstream.0];
        if !target.bind.is_client() || upstream.target == Target::OriginalDestination {
            return None;
        }
        let (RuleId(r), prefix) = target.destinations(self).find(|(_, prefix)| {
            !upstream
                .servers()
                .iter()
                .any(|server| server.is_ipv4() == prefix.addr().is_ipv4())
        })?;
        Some(format!(
            "{}: bind {:?} connects from the client's address, but upstream {:?} has no {} server \
             for the clients of rule {:?} (intercept[{r}]) prefix {prefix}: they are refused",
            target.path,
            target.bind.to_string(),
            upstream.name,
            if prefix.addr().is_ipv4() {
                "IPv4"
            } else {
                "IPv6"
            },
            self.rules[r].name,
        ))
    }
}

/// Whether `earlier` holds for every connection `later` holds for, so that
/// `later`, coming after it, is never reached.
fn covers(earlier: &Conditions, later: &Conditions, every_rule: &[RuleId]) -> bool {
    list_covers(
        earlier.intercept.as_deref(),
        or_every(&later.intercept, every_rule),
        |e, l| e == l,
    ) && list_covers(
        earlier.destination.as_deref(),
        or_every(&later.destination, &EVERY_ADDRESS),
        |e, l| e.contains(l),
    ) && list_covers(
        earlier.source.as_deref(),
        or_every(&later.source, &EVERY_ADDRESS),
        |e, l| e.contains(l),
    ) && list_covers(
        earlier.ports.as_deref(),
        or_every(&later.ports, &[PortSpec::Any]),
        |&e, &l| e.intersection(l) == Some(l),
    ) && list_covers(
        earlier.target.as_deref(),
        later.target.as_deref(),
        super::NamePattern::covers,
    ) && hello_covers(earlier.hello.as_ref(), later.hello.as_ref())
}

fn hello_covers(earlier: Option<&HelloConditions>, later: Option<&HelloConditions>) -> bool {
    let names = |e: &Option<Vec<_>>, l: &Option<Vec<_>>| {
        list_covers(e.as_deref(), l.as_deref(), super::NamePattern::covers)
    };
    match (earlier, later) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HelloConditions::Other), Some(HelloConditions::Other)) => true,
        (Some(HelloConditions::Http { host: e }), Some(HelloConditions::Http { host: l })) => {
            names(e, l)
        }
        (
            Some(HelloConditions::Tls {
                sni: e_sni,
                alpn: e_alpn,
            }),
            Some(HelloConditions::Tls {
                sni: l_sni,
                alpn: l_alpn,
            }),
        ) => {
            let sni = match (e_sni, l_sni) {
                (SniCondition::Any, _) | (SniCondition::Absent, SniCondition::Absent) => true,
                (SniCondition::Names(e), SniCondition::Names(l)) => {
                    list_covers(Some(e), Some(l), super::NamePattern::covers)
                }
                _ => false,
            };
            // Any-of lists: fewer protocols are a narrower condition.
            sni && list_covers(e_alpn.as_deref(), l_alpn.as_deref(), |e, l| e == l)
        }
        _ => false,
    }
}

/// An address, port or rule condition not given is the same as one listing
/// everything.
fn or_every<'a, T>(list: &'a Option<Vec<T>>, every: &'a [T]) -> Option<&'a [T]> {
    Some(list.as_deref().unwrap_or(every))
}

/// Whether a list condition `earlier` holds wherever `later` does: each of
/// `later`'s elements is covered by one of `earlier`'s (an element split
/// across several is missed, which only costs a warning). `None` is "not
/// given".
fn list_covers<T>(
    earlier: Option<&[T]>,
    later: Option<&[T]>,
    covers: impl Fn(&T, &T) -> bool,
) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(earlier), Some(later)) => later.iter().all(|l| earlier.iter().any(|e| covers(e, l))),
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::Policy;

    /// The warnings of a policy with these routes and three rules: HTTPS
    /// and SSH with a default upstream, HTTP without.
    fn warnings(routes: &str) -> Vec<String> {
        let json = format!(
            r#"{{
  "intercept": [
    {{ "name": "https", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [443], "upstream": "a" }},
    {{ "name": "http", "prefixes": ["192.0.2.0/24", "2001:db8:a::/64"], "ports": [80, "8000-8099"] }},
    {{ "name": "ssh", "prefixes": ["192.0.2.0/24"], "ports": [22], "upstream": "a" }}
  ],
  "routes": [{routes}],
  "upstreams": {{ "a": {{ "servers": ["203.0.113.1:8000"] }} }}
}}"#
        );
        Policy::from_json(&json)
            .unwrap_or_else(|e| panic!("{e}\n{json}"))
            .warnings()
    }

    /// Whether the second route is reported as shadowed by the first. A
    /// third route keeps the HTTP rule from being reported; whether it is
    /// reported itself does not matter here.
    fn shadows(earlier: &str, later: &str) -> bool {
        let mut found = warnings(&format!(
            r#"{{ "match": {earlier}, "upstream": "a" }},
               {{ "match": {later}, "upstream": "a" }},
               {{ "match": {{ "intercept": ["http"] }}, "upstream": "a" }}"#
        ));
        found.retain(|warning| !warning.starts_with("routes[2]: "));
        match found.as_slice() {
            [] => false,
            [warning] if warning.starts_with("routes[1]: never matches: routes[0] ") => true,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message() {
        assert_eq!(
            warnings(
                r#"{ "match": { "intercept": ["http"] }, "upstream": "a" },
                   { "name": "api", "match": { "sni": ["*.example.com"] }, "upstream": "a" },
                   { "match": { "sni": ["api.example.com"] }, "reject": true }"#
            ),
            [r#"routes[2]: never matches: routes[1] ("api") matches every connection it would"#]
        );
    }

    #[test]
    fn everything_shadows_everything() {
        for later in [
            "{}",
            r#"{ "sni": ["api.example.com"] }"#,
            r#"{ "source": ["198.51.100.0/24"], "ports": [443] }"#,
            r#"{ "protocol": "other" }"#,
        ] {
            assert!(shadows("{}", later), "{later}");
        }
        assert!(!shadows(r#"{ "protocol": "tls" }"#, "{}"));
        assert!(!shadows(r#"{ "source": ["198.51.100.0/24"] }"#, "{}"));
    }

    #[test]
    fn addresses_and_ports() {
        assert!(shadows(
            r#"{ "destination": ["192.0.2.0/24", "2001:db8::/32"] }"#,
            r#"{ "destination": ["192.0.2.128/25", "2001:db8:a::/64"], "ports": [443] }"#
        ));
        assert!(!shadows(
            r#"{ "destination": ["192.0.2.128/25"] }"#,
            r#"{ "destination": ["192.0.2.0/24"] }"#
        ));
        // Not given is everything, which a list covers only if it says so.
        assert!(!shadows(
            r#"{ "source": ["198.51.100.0/24"] }"#,
            r#"{ "ports": [443] }"#
        ));
        assert!(shadows(
            r#"{ "source": ["0.0.0.0/0", "::/0"] }"#,
            r#"{ "ports": [443] }"#
        ));
        assert!(shadows(
            r#"{ "ports": ["8000-8099"] }"#,
            r#"{ "ports": [8080, "8000-8010"] }"#
        ));
        assert!(shadows(r#"{ "ports": ["*"] }"#, r#"{ "ports": [80] }"#));
        assert!(!shadows(
            r#"{ "ports": ["8000-8050"] }"#,
            r#"{ "ports": ["8040-8060"] }"#
        ));
        // Covered only by two earlier elements together: not reported (conservative).
        assert!(!shadows(
            r#"{ "ports": ["8000-8049", "8050-8099"] }"#,
            r#"{ "ports": ["8040-8060"] }"#
        ));
        assert!(shadows(
            r#"{ "intercept": ["https", "http"] }"#,
            r#"{ "intercept": ["http"] }"#
        ));
        assert!(!shadows(
            r#"{ "intercept": ["https"] }"#,
            r#"{ "intercept": ["http"] }"#
        ));
        assert!(shadows(
            r#"{ "intercept": ["https", "http", "ssh"] }"#,
            r#"{ "ports": [443] }"#
        ));
    }

    #[test]
    fn names() {
        assert!(shadows(
            r#"{ "sni": ["api.example.com"] }"#,
            r#"{ "sni": ["API.example.com."] }"#
        ));
        assert!(shadows(
            r#"{ "sni": ["*.example.com"] }"#,
            r#"{ "sni": ["a.example.com", "*.b.example.com"] }"#
        ));
        assert!(!shadows(
            r#"{ "sni": ["*.example.com"] }"#,
            r#"{ "sni": ["example.com"] }"#
        ));
        assert!(!shadows(
            r#"{ "sni": ["api.example.com"] }"#,
            r#"{ "sni": ["*.example.com"] }"#
        ));
        assert!(shadows(
            r#"{ "host": ["*.example.com"] }"#,
            r#"{ "host": ["www.example.com"] }"#
        ));
        assert!(!shadows(
            r#"{ "host": ["www.example.com"] }"#,
            r#"{ "protocol": "http" }"#
        ));
        // The same name in another protocol.
        assert!(!shadows(
            r#"{ "sni": ["www.example.com"] }"#,
            r#"{ "host": ["www.example.com"] }"#
        ));
    }

    #[test]
    fn protocols_and_tls_details() {
        assert!(shadows(
            r#"{ "protocol": "tls" }"#,
            r#"{ "sni": ["a.example.com"], "alpn": ["h2"] }"#
        ));
        assert!(shadows(r#"{ "protocol": "tls" }"#, r#"{ "no_sni": true }"#));
        assert!(shadows(
            r#"{ "protocol": "http" }"#,
            r#"{ "host": ["a.example.com"] }"#
        ));
        assert!(shadows(
            r#"{ "protocol": "other" }"#,
            r#"{ "protocol": "other", "ports": [22] }"#
        ));
        assert!(!shadows(
            r#"{ "protocol": "tls" }"#,
            r#"{ "protocol": "other" }"#
        ));
        assert!(shadows(
            r#"{ "no_sni": true }"#,
            r#"{ "no_sni": true, "alpn": ["h2"] }"#
        ));
        assert!(!shadows(
            r#"{ "no_sni": true }"#,
            r#"{ "sni": ["a.example.com"] }"#
        ));
        assert!(!shadows(
            r#"{ "sni": ["a.example.com"] }"#,
            r#"{ "no_sni": true }"#
        ));
        // ALPN is any-of: the earlier list must include all the later one's.
        assert!(shadows(
            r#"{ "alpn": ["h2", "http/1.1"] }"#,
            r#"{ "alpn": ["h2"] }"#
        ));
        assert!(!shadows(
            r#"{ "alpn": ["h2"] }"#,
            r#"{ "alpn": ["h2", "http/1.1"] }"#
        ));
        assert!(!shadows(
            r#"{ "alpn": ["h2"] }"#,
            r#"{ "protocol": "tls" }"#
        ));
        assert!(!shadows(
            r#"{ "sni": ["a.example.com"], "alpn": ["h2"] }"#,
            r#"{ "sni": ["a.example.com"] }"#
        ));
    }

    #[test]
    fn routes_no_rule_steers_to() {
        for conditions in [
            r#"{ "destination": ["203.0.113.0/24"] }"#,
            r#"{ "ports": [25] }"#,
            r#"{ "intercept": ["https"], "ports": [80] }"#,
            r#"{ "intercept": ["ssh"], "destination": ["2001:db8:a::/64"] }"#,
        ] {
            assert_eq!(
                warnings(&format!(
                    r#"{{ "match": {{ "intercept": ["http"] }}, "upstream": "a" }},
                       {{ "match": {conditions}, "upstream": "a" }}"#
                )),
                [
                    "routes[1]: never matches: no intercept rule steers a connection \
                  that its intercept, destination and ports conditions allow"
                ],
                "{conditions}"
            );
        }
        // Overlapping either way is enough.
        for conditions in [
            r#"{ "destination": ["192.0.0.0/16"] }"#,
            r#"{ "destination": ["192.0.2.10/32"], "ports": ["1-100"] }"#,
        ] {
            assert_eq!(
                warnings(&format!(
                    r#"{{ "match": {{ "intercept": ["http"] }}, "upstream": "a" }},
                       {{ "match": {conditions}, "upstream": "a" }}"#
                )),
                Vec::<String>::new(),
                "{conditions}"
            );
        }
    }

    #[test]
    fn rule_without_upstream_or_route() {
        let refused = "intercept[1]: no upstream and no route applies to it: \
                       every connection it steers is refused";
        assert_eq!(warnings(""), [refused]);
        assert_eq!(
            warnings(r#"{ "match": { "ports": [443] }, "upstream": "a" }"#),
            [refused]
        );
        // A route that may apply is enough, even one that needs the hello.
        assert_eq!(
            warnings(r#"{ "match": { "host": ["www.example.com"] }, "upstream": "a" }"#),
            Vec::<String>::new()
        );
        assert_eq!(
            warnings(r#"{ "match": { "ports": [8080] }, "reject": true }"#),
            Vec::<String>::new()
        );
    }
}
