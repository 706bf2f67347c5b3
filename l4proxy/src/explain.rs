//! `l4proxy explain`: which rule, route and upstream a connection would
//! take, and why, decided by the daemon's own code (`route::decide`) from
//! the policy file alone. A steered connection is named by its destination;
//! a CONNECT request by the listener it is sent to and its target, which
//! the rule's checks that need only the policy see first (`tunnel`).

use std::{fmt::Write, net::SocketAddr};

use anyhow::{Context, bail};

use crate::{
    addrs::{ClientAddr, OrigDstAddr},
    cli::ExplainArgs,
    connect_head::{self, Host},
    policy::{Policy, RuleId, Target},
    route, sniff, tunnel,
};

/// What `explain` prints for `args`, line by line.
pub fn explain(policy: &Policy, args: &ExplainArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    let taken = match &args.connect {
        Some(asked) => connect_request(policy, args, asked, &mut out)?,
        None => steered(policy, args.dst, &mut out),
    };
    let Some((rule, orig_dst, name)) = taken else {
        return Ok(out);
    };
    let conn = route::Connection {
        client: ClientAddr(args.src),
        orig_dst: OrigDstAddr(orig_dst),
        rule,
        target: name.as_deref(),
    };
    // As the sniffer reads them: a name in its normal form, an SNI that is
    // none no SNI; `--host` in a request head the daemon's parser reads (a
    // head it refuses is "other").
    let sni = args
        .sni
        .as_deref()
        .and_then(|sni| sniff::normalize_host_name(sni.as_bytes()));
    let request = args.host.as_deref().and_then(|host| {
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        sniff::http::parse_request_head(head.as_bytes())
            .ok()
            .flatten()
    });
    let alpn = &args.alpn;
    let plain = match &request {
        Some(request) => route::Hello::Http {
            host: request.host.as_deref(),
        },
        None => route::Hello::Other,
    };
    // A rule that terminates TLS routes on its handshake (the name, the
    // protocol agreed: the first of its `alpn` the client offers) and on
    // what the decrypted stream starts with (`--host`: an HTTP head).
    let agreed: Vec<String> = match &policy.rules[rule.0].terminate {
        Some(terminate) => terminate
            .alpn
            .iter()
            .find(|protocol| alpn.contains(protocol))
            .cloned()
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    let hello = match &policy.rules[rule.0].terminate {
        Some(_) => route::Hello::Terminated {
            sni: sni.as_deref(),
            alpn: &agreed,
            inner: Some(&plain),
        },
        None if args.sni.is_some() || !alpn.is_empty() || args.tls => route::Hello::Tls {
            sni: sni.as_deref(),
            alpn,
        },
        None => plain,
    };
    let decision = route::decide(policy, &conn, Some(&hello));
    match &decision {
        route::Decision::Upstream {
            upstream,
            name,
            bind,
            why,
        } => {
            writeln!(out, "route: {}", why.route_name())?;
            match &policy.upstreams[upstream.0].target {
                Target::Servers(servers) => writeln!(out, "upstream: {name} {servers:?}")?,
                Target::Parent(parent) => writeln!(
                    out,
                    "upstream: {name} (through parent proxies {:?})",
                    parent.servers
                )?,
                Target::OriginalDestination => {
                    writeln!(out, "upstream: {name} (original destination {orig_dst})")?
                }
            }
            writeln!(out, "bind: {bind}")?;
        }
        route::Decision::Reject { why } => {
            writeln!(out, "route: {}\nrejected", why.route_name())?;
        }
        _ => writeln!(out, "no route")?,
    }
    writeln!(out, "why: {decision}")?;
    Ok(out)
}

/// What a rule takes: its id, the destination routes see, and the name a
/// CONNECT client asked for.
type Taken = Option<(RuleId, SocketAddr, Option<String>)>;

/// The rule the kernel steers a connection to `dst` to, if any.
fn steered(policy: &Policy, dst: SocketAddr, out: &mut String) -> Taken {
    let Some(rule) = route::match_rule(policy, dst) else {
        let _ = writeln!(out, "not intercepted: no intercept rule matches {dst}");
        if let Some(RuleId(r)) = policy.connect_rule(dst) {
            let _ = writeln!(
                out,
                "{dst} is a CONNECT listener of rule {} (intercept[{r}]): name the request's \
                 target with --connect HOST:PORT",
                policy.rules[r].name
            );
        }
        return None;
    };
    let name = &policy.rules[rule.0].name;
    let _ = writeln!(out, "intercept rule: {name} (intercept[{}])", rule.0);
    Some((rule, dst, None))
}

/// A CONNECT request for `asked` sent to the listener `args.dst`: the
/// rule's checks that need only the policy, as the daemon makes them (the
/// client, the port, the name or address), then what routes see. What the
/// daemon also asks of its host (credentials, this host's own addresses,
/// its routing, the name's resolution) is said, not checked.
fn connect_request(
    policy: &Policy,
    args: &ExplainArgs,
    asked: &str,
    out: &mut String,
) -> anyhow::Result<Taken> {
    let Some(rule) = policy.connect_rule(args.dst) else {
        bail!(
            "--connect: {} is not a CONNECT listener of this policy",
            args.dst
        );
    };
    let front = policy.rules[rule.0]
        .connect
        .as_ref()
        .context("a connect rule has its front end")?;
    let name = &policy.rules[rule.0].name;
    writeln!(
        out,
        "CONNECT listener of rule: {name} (intercept[{}])",
        rule.0
    )?;
    // Read as the daemon reads a request line.
    let head = format!("CONNECT {asked} HTTP/1.1\r\nHost: {asked}\r\n\r\n");
    let target = match connect_head::parse(head.as_bytes()) {
        Ok(Some(request)) => request.target.context("a CONNECT request has a target")?,
        Ok(None) => bail!("--connect {asked:?}: not a whole request target"),
        Err(e) => bail!("--connect {asked:?}: {e}"),
    };
    let refused = |why: &dyn std::fmt::Display, out: &mut String| {
        let _ = writeln!(out, "refused (403): {why}");
        Ok(None)
    };
    if !front.admits(args.src.ip()) {
        if policy.rules[rule.0].terminate.is_some() {
            // As the daemon does: before the TLS handshake, no answer.
            let _ = writeln!(
                out,
                "refused (a reset, before the TLS handshake): {}",
                tunnel::Refused::Client
            );
            return Ok(None);
        }
        return refused(&tunnel::Refused::Client, out);
    }
    if front.users.is_some() {
        writeln!(
            out,
            "credentials: asked for (Proxy-Authorization, against the rule's htpasswd); not checked here"
        )?;
    }
    if let Err(e) = tunnel::listed(front, &target) {
        return refused(&e, out);
    }
    let (ip, name) = match target.host {
        Host::Ip(ip) => (ip.to_canonical(), None),
        Host::Name(name) => match args.resolved {
            Some(ip) => (ip.to_canonical(), Some(name)),
            None => bail!(
                "--connect {asked}: a name; give the address it resolves to with --resolved \
                 (the rule's destinations and the routes see the address)"
            ),
        },
    };
    if let Err(why) = tunnel::allowed(front, ip, |_| false, |_| Ok(())) {
        let refusal = match &name {
            // As the daemon says it of a name's addresses.
            Some(name) => tunnel::Refused::Resolved {
                name: name.clone(),
                first: ip,
                why,
            },
            None => tunnel::Refused::Destination(ip, why),
        };
        return refused(&refusal, out);
    }
    let to = SocketAddr::new(ip, target.port);
    writeln!(
        out,
        "tunnel: to {to} (the daemon also refuses this host's own addresses and those its \
         routing delivers here, which explain does not know)"
    )?;
    Ok(Some((rule, to, name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"{
      "intercept": [
        { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "direct-web" },
        { "name": "proxy", "upstream": "direct",
          "connect": { "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"],
                       "names": ["*.example.com"], "destinations": ["203.0.113.0/24"] } }
      ],
      "routes": [
        { "name": "partner", "match": { "target": ["*.partner.example.com"] }, "upstream": "parent" }
      ],
      "upstreams": {
        "direct-web": { "servers": ["203.0.113.2:443"] },
        "direct": { "original_destination": true },
        "parent": { "parent": { "servers": ["203.0.113.8:3128"] } }
      }
    }"#;

    fn ask(
        src: &str,
        dst: &str,
        connect: Option<&str>,
        resolved: Option<&str>,
    ) -> anyhow::Result<String> {
        let args = ExplainArgs {
            file: "unused".into(),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sni: None,
            alpn: Vec::new(),
            tls: false,
            host: None,
            connect: connect.map(str::to_owned),
            resolved: resolved.map(|ip| ip.parse().unwrap()),
        };
        explain(&Policy::from_json(POLICY).unwrap(), &args)
    }

    const CLIENT: &str = "198.51.100.7:40000";

    /// A TLS listener resets a client outside its `clients` before the
    /// handshake: explain says so, not a 403.
    #[test]
    fn a_tls_listener_refuses_outside_clients_with_a_reset() {
        let dir = std::env::temp_dir().join(format!("l4proxy-explain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let issued = rcgen::generate_simple_self_signed(vec!["proxy.example".to_owned()]).unwrap();
        let (chain, key) = (dir.join("chain.pem"), dir.join("key.pem"));
        std::fs::write(&chain, issued.cert.pem()).unwrap();
        std::fs::write(&key, issued.signing_key.serialize_pem()).unwrap();
        let policy = Policy::from_json(&format!(
            r#"{{
              "intercept": [
                {{ "name": "proxy", "upstream": "direct",
                  "terminate": {{ "certificates": [ {{ "chain": "{}", "key": "{}" }} ] }},
                  "connect": {{ "listen": ["198.51.100.1:3128"], "clients": ["198.51.100.0/24"] }} }}
              ],
              "upstreams": {{ "direct": {{ "original_destination": true }} }}
            }}"#,
            chain.display(),
            key.display()
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let policy = policy.unwrap();
        let args = ExplainArgs {
            file: "unused".into(),
            src: "192.0.2.7:40000".parse().unwrap(),
            dst: LISTENER.parse().unwrap(),
            sni: None,
            alpn: Vec::new(),
            tls: false,
            host: None,
            connect: Some("203.0.113.9:443".to_owned()),
            resolved: None,
        };
        let said = explain(&policy, &args).unwrap();
        assert!(
            said.contains("refused (a reset, before the TLS handshake): client not allowed"),
            "{said}"
        );
    }

    /// A Host that is not a name makes the head "other", as in the daemon;
    /// an empty one names nothing.
    #[test]
    fn a_host_that_is_not_a_name_is_explained_as_other() {
        let policy = Policy::from_json(
            r#"{
              "intercept": [ { "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [80], "upstream": "web" } ],
              "routes": [
                { "name": "ads", "match": { "host": ["*.ads.example.com"] }, "reject": true },
                { "name": "unreadable", "match": { "protocol": "other" }, "reject": true }
              ],
              "upstreams": { "web": { "servers": ["203.0.113.2:80"] } }
            }"#,
        )
        .unwrap();
        let ask = |host: &str| {
            let args = ExplainArgs {
                file: "unused".into(),
                src: CLIENT.parse().unwrap(),
                dst: "192.0.2.10:80".parse().unwrap(),
                sni: None,
                alpn: Vec::new(),
                tls: false,
                host: Some(host.to_owned()),
                connect: None,
                resolved: None,
            };
            explain(&policy, &args).unwrap()
        };
        for (host, want) in [
            ("a.ads.example.com", "route: ads"),
            ("x!.ads.example.com", "route: unreadable"),
            ("", "upstream: web"),
        ] {
            let said = ask(host);
            assert!(said.contains(want), "--host {host:?}: {said}");
        }
    }
    const LISTENER: &str = "198.51.100.1:3128";

    #[test]
    fn a_connect_request_is_checked_then_routed_as_the_daemon_would() {
        let partner = ask(
            CLIENT,
            LISTENER,
            Some("a.partner.example.com:443"),
            Some("203.0.113.9"),
        )
        .unwrap();
        assert!(
            partner.starts_with(
                "CONNECT listener of rule: proxy (intercept[1])\ntunnel: to 203.0.113.9:443"
            ) && partner.contains(
                "route: partner\nupstream: parent (through parent proxies [203.0.113.8:3128])"
            ),
            "{partner}"
        );
        let address = ask(CLIENT, LISTENER, Some("203.0.113.9:443"), None).unwrap();
        assert!(
            address.contains("upstream: direct (original destination 203.0.113.9:443)"),
            "{address}"
        );
        for (src, connect, resolved, refused) in [
            (
                "192.0.2.7:40000",
                "203.0.113.9:443",
                None,
                "client not allowed by the rule's clients",
            ),
            (
                CLIENT,
                "www.other.com:443",
                Some("203.0.113.9"),
                "name www.other.com not allowed by the rule's names",
            ),
            (
                CLIENT,
                "www.example.com:8443",
                Some("203.0.113.9"),
                "port 8443 not allowed by the rule's ports",
            ),
            (
                CLIENT,
                "192.0.2.1:443",
                None,
                "destination 192.0.2.1 refused: outside the rule's destinations",
            ),
            (
                CLIENT,
                "www.example.com:443",
                Some("192.0.2.1"),
                "www.example.com resolves only to refused addresses (192.0.2.1: outside the \
                 rule's destinations)",
            ),
        ] {
            let said = ask(src, LISTENER, Some(connect), resolved).unwrap();
            assert!(
                said.ends_with(&format!("refused (403): {refused}\n")) && !said.contains("route:"),
                "{connect}: {said}"
            );
        }
    }

    #[test]
    fn what_explain_cannot_decide_is_an_error() {
        let err = ask(CLIENT, LISTENER, Some("www.example.com:443"), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("give the address it resolves to with --resolved"),
            "{err}"
        );
        let err = ask(CLIENT, "192.0.2.10:443", Some("203.0.113.9:443"), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("192.0.2.10:443 is not a CONNECT listener"),
            "{err}"
        );
        let err = ask(CLIENT, LISTENER, Some("no port"), None).unwrap_err();
        assert!(
            err.to_string().starts_with("--connect \"no port\""),
            "{err}"
        );
    }

    #[test]
    fn a_listener_asked_as_a_steered_destination_points_at_connect() {
        let said = ask(CLIENT, LISTENER, None, None).unwrap();
        assert_eq!(
            said,
            "not intercepted: no intercept rule matches 198.51.100.1:3128\n198.51.100.1:3128 is a \
             CONNECT listener of rule proxy (intercept[1]): name the request's target with \
             --connect HOST:PORT\n"
        );
        let steered = ask(CLIENT, "192.0.2.10:443", None, None).unwrap();
        assert!(
            steered.starts_with("intercept rule: web (intercept[0])\n"),
            "{steered}"
        );
    }
}
