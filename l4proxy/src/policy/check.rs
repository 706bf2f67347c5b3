//! Raw → checked: resolves rule and upstream names, then runs the checks that
//! span several fields. These errors carry the JSON path only: serde is done
//! with the text by then.

use std::collections::HashMap;

use ipnet::IpNet;
use l4proxy_common::MAX_RULE_ENTRIES;

use super::{
    Action, Conditions, InterceptRule, Policy, PolicyError, PortSpec, Route, RuleId, Upstream,
    UpstreamId, raw,
};
use crate::{intercept::rules, route};

pub(super) fn check(raw: raw::Policy) -> Result<Policy, PolicyError> {
    // BTreeMap order: upstreams sorted by name, so they can be found by binary search.
    let upstreams: Vec<Upstream> = raw
        .upstreams
        .into_iter()
        .map(|(name, raw::Object(upstream))| Upstream {
            name,
            servers: upstream.servers.into_iter().map(|s| s.0).collect(),
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
    check_size(&policy)?;
    check_loops(&policy)?;
    Ok(policy)
}

fn check_rules(
    raw: Vec<raw::Object<raw::Rule>>,
    upstreams: &[Upstream],
) -> Result<Vec<InterceptRule>, PolicyError> {
    let mut rules = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
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
        rules.push(InterceptRule {
            name: rule.name.0,
            prefixes: rule.prefixes.into_iter().map(|p| p.0).collect(),
            ports: rule.ports.into_iter().map(|p| p.0).collect(),
            upstream,
        });
    }
    Ok(rules)
}

fn check_routes(
    raw: Vec<raw::Route>,
    rules: &[InterceptRule],
    upstreams: &[Upstream],
) -> Result<Vec<Route>, PolicyError> {
    let mut routes = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, route) in raw.into_iter().enumerate() {
        let name = route.name.map(|name| name.0);
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
                hello,
            },
            action,
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
    let mut claims: HashMap<IpNet, Vec<(usize, PortSpec)>> = HashMap::new();
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

/// The proxy's own connection to an intercepted address would be steered back
/// into the proxy. Every upstream is checked, whether a rule or a route names
/// it.
fn check_loops(policy: &Policy) -> Result<(), PolicyError> {
    for upstream in &policy.upstreams {
        for (k, &server) in upstream.servers.iter().enumerate() {
            if let Some(RuleId(r)) = route::match_rule(policy, server) {
                return Err(PolicyError::at(
                    format!("upstreams.{}.servers[{k}]", upstream.name),
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

/// The kernel's rule map has a fixed size; port ranges take one entry per port.
fn check_size(policy: &Policy) -> Result<(), PolicyError> {
    let count = rules::entry_count(policy);
    if count > MAX_RULE_ENTRIES as usize {
        return Err(PolicyError::at(
            "intercept",
            format!(
                "compiles to {count} kernel entries, more than the limit of {MAX_RULE_ENTRIES} \
                 (each port of a range takes one entry per prefix)"
            ),
        ));
    }
    Ok(())
}
