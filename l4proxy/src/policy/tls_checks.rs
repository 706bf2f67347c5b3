//! The checks on a policy's TLS that span fields: where termination may be
//! written, and what its certificates are worth (expiry, names).

use std::time::{SystemTime, UNIX_EPOCH};

use super::{HelloConditions, Policy, PolicyError, RuleId, SniCondition, Target, Terminate};

/// A certificate expiring sooner than this is warned about.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// TLS terminated twice, terminated on what a route matched as not TLS,
/// originated inside TLS to a parent, or offering a CONNECT client another
/// protocol than HTTP/1.x, is refused.
pub(super) fn check(policy: &Policy) -> Result<(), PolicyError> {
    for (i, rule) in policy.rules.iter().enumerate() {
        let (Some(_), Some(terminate)) = (&rule.connect, &rule.terminate) else {
            continue;
        };
        // Its CONNECT head is read as HTTP/1.x: a client that agreed on h2
        // with l4proxy would send its request as h2 frames.
        if let Some(k) = terminate
            .alpn
            .iter()
            .position(|alpn| alpn != "http/1.1" && alpn != "http/1.0")
        {
            return Err(PolicyError::at(
                format!("intercept[{i}].terminate.alpn[{k}]"),
                format!(
                    "a CONNECT rule's clients ask in HTTP/1.x; offering {:?} they could \
                     agree on it and send a CONNECT l4proxy does not read",
                    terminate.alpn[k]
                ),
            ));
        }
    }
    for (j, route) in policy.routes.iter().enumerate() {
        if route.terminate.is_none() {
            continue;
        }
        if let Some(HelloConditions::Http { .. } | HelloConditions::Other) = route.conditions.hello
        {
            return Err(PolicyError::at(
                format!("routes[{j}].terminate"),
                "the route matches connections that are not TLS (\"host\", or \"protocol\" \"http\" \
                 or \"other\"), whose TLS it cannot terminate",
            ));
        }
        let twice = policy
            .rules
            .iter()
            .enumerate()
            .find(|(r, rule)| rule.terminate.is_some() && route.may_apply(RuleId(*r), rule));
        if let Some((r, rule)) = twice {
            return Err(PolicyError::at(
                format!("routes[{j}].terminate"),
                format!(
                    "intercept[{r}] ({:?}) terminates TLS already, before routes are \
                     chosen; keep this route to other rules with \"intercept\"",
                    rule.name
                ),
            ));
        }
    }
    for upstream in &policy.upstreams {
        if let Target::Parent(parent) = &upstream.target
            && parent.tls.is_some()
            && upstream.tls.is_some()
        {
            return Err(PolicyError::at(
                format!("upstreams.{}.tls", upstream.name),
                "TLS to the server inside TLS to the parent is not supported: \
                 drop one of \"tls\" and \"parent.tls\"",
            ));
        }
    }
    Ok(())
}

/// One message per certificate that expires within 30 days (or has), or
/// that no server name can choose; per client certificate the client's
/// name decides where it goes; and per route whose SNI names no certificate
/// of the TLS it is routed under covers.
pub(super) fn warnings(policy: &Policy) -> Vec<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut warnings = Vec::new();
    let terminations =
        policy
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| Some((format!("intercept[{i}]"), rule.terminate.as_ref()?)))
            .chain(policy.routes.iter().enumerate().filter_map(|(i, route)| {
                Some((format!("routes[{i}]"), route.terminate.as_ref()?))
            }));
    for (at, terminate) in terminations {
        for (k, certificate) in terminate.certificates.iter().enumerate() {
            // Chosen by no client's name; the first is still the default.
            let default = k == 0 && !terminate.refuse_unknown_names;
            if certificate.names.is_empty() && !default {
                warnings.push(format!(
                    "{at}.terminate.certificates[{k}]: {} ({}) has no DNS name \
                     (subjectAltName): no client's server name chooses it, so it is never \
                     presented",
                    certificate.chain_file, certificate.subject
                ));
            }
            let days = (certificate.not_after - now).div_euclid(86_400);
            let when = if days < 0 {
                "has expired".to_owned()
            } else if days < EXPIRY_WARNING_DAYS {
                format!("expires in {days} days")
            } else {
                continue;
            };
            warnings.push(format!(
                "{at}.terminate.certificates[{k}]: {} ({}) {when}",
                certificate.chain_file, certificate.subject
            ));
        }
    }
    for upstream in &policy.upstreams {
        if let Some(tls) = &upstream.tls
            && tls.certificate.is_some()
            && tls.server_name.is_none()
        {
            warnings.push(format!(
                "upstreams.{}.tls: a client certificate without \"server_name\": it is shown \
                 to any server with a valid certificate for the name the client asked for",
                upstream.name
            ));
        }
    }
    // A route terminating with its own certificates: its SNI names should
    // be among theirs; under a terminating rule, among the rule's.
    for (j, route) in policy.routes.iter().enumerate() {
        let Some(HelloConditions::Tls {
            sni: SniCondition::Names(patterns),
            ..
        }) = &route.conditions.hello
        else {
            continue;
        };
        let mut under: Vec<(String, &Terminate)> = Vec::new();
        if let Some(own) = &route.terminate {
            under.push((format!("routes[{j}].terminate"), own));
        }
        for (r, rule) in policy.rules.iter().enumerate() {
            if let Some(terminate) = &rule.terminate
                && route.may_apply(RuleId(r), rule)
            {
                under.push((format!("intercept[{r}].terminate"), terminate));
            }
        }
        for (at, terminate) in under {
            let covered = patterns.iter().any(|pattern| {
                terminate
                    .certificates
                    .iter()
                    .flat_map(|c| &c.names)
                    .any(|name| pattern.matches(name) || covers(name, &pattern.to_string()))
            });
            if !covered {
                warnings.push(format!(
                    "routes[{j}].match.sni: no certificate of {at} is for these names: \
                     their clients get the default certificate or a refusal"
                ));
            }
        }
    }
    warnings
}

/// Whether certificate name `name` (perhaps `*.example.com`) covers host
/// name `host` (a wildcard covers one label).
fn covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| label != "*" && rest == parent),
        None => name == host,
    }
}
