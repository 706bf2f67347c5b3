//! `terminate` and `tls`: files read and checked as the policy is, where
//! each may be written, and the warnings about certificates.

use std::path::PathBuf;

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, date_time_ymd};

use super::{super::Policy, error_of};

/// A directory of PEM files made for one test, removed on drop.
pub(super) struct Files(PathBuf);

impl Files {
    pub(super) fn new(test: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("l4proxy-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// A CA, and a leaf it issues for `names` valid until `until` (y, m, d):
    /// the paths of (chain, key, CA).
    pub(super) fn leaf(
        &self,
        prefix: &str,
        names: &[&str],
        until: (i32, u8, u8),
    ) -> (String, String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("{prefix} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or(prefix));
        leaf.not_before = date_time_ymd(2020, 1, 1);
        leaf.not_after = date_time_ymd(until.0, until.1, until.2);
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        (
            self.write(&format!("{prefix}.pem"), &cert.pem()),
            self.write(&format!("{prefix}.key"), &key.serialize_pem()),
            self.write(&format!("{prefix}-ca.pem"), &ca_cert.pem()),
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) const FAR: (i32, u8, u8) = (2099, 1, 1);

fn policy(rule_extra: &str, routes: &str, upstream_extra: &str) -> String {
    format!(
        r#"{{ "intercept": [ {{ "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "app"{rule_extra} }} ],
  "routes": [{routes}],
  "upstreams": {{ "app": {{ "servers": ["203.0.113.2:443"]{upstream_extra} }} }} }}"#
    )
}

fn terminate(chain: &str, key: &str) -> String {
    format!(r#"{{ "certificates": [ {{ "chain": "{chain}", "key": "{key}" }} ] }}"#)
}

#[test]
fn terminate_and_tls_are_read_with_their_files() {
    let files = Files::new("read");
    let (chain, key, ca) = files.leaf("app", &["app.example.test", "*.example.test"], FAR);
    let json = policy(
        &format!(r#", "terminate": {}"#, terminate(&chain, &key)),
        "",
        &format!(
            r#", "tls": {{ "ca": "{ca}", "server_name": "app.internal.test", "alpn": ["h2"] }}"#
        ),
    );
    let policy = Policy::from_json(&json).unwrap();
    let terminate = policy.rules[0].terminate.as_ref().unwrap();
    assert_eq!(
        terminate.certificates[0].names,
        ["app.example.test", "*.example.test"]
    );
    assert_eq!(terminate.min_version, super::super::TlsVersion::V1_2);
    let tls = policy.upstreams[0].tls.as_ref().unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("app.internal.test"));
    assert_eq!(tls.alpn.as_deref(), Some(&["h2".to_owned()][..]));
    assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
}

#[test]
fn bad_files_are_refused_with_the_path_and_the_file() {
    let files = Files::new("bad");
    let (chain, key, _) = files.leaf("app", &["app.example.test"], FAR);
    let (_, other_key, _) = files.leaf("other", &["other.example.test"], FAR);
    let garbage = files.write(
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
    );
    let empty = files.write("empty.pem", "");
    let missing = files.0.join("missing.pem").display().to_string();
    for (chain, key, reason) in [
        (missing.as_str(), key.as_str(), "missing.pem: No such file"),
        (garbage.as_str(), key.as_str(), "garbage.pem"),
        (empty.as_str(), key.as_str(), "empty.pem: no certificate"),
        (chain.as_str(), empty.as_str(), "empty.pem: no private key"),
        (
            chain.as_str(),
            other_key.as_str(),
            "the key does not match the certificate",
        ),
    ] {
        let err = error_of(&policy(
            &format!(r#", "terminate": {}"#, terminate(chain, key)),
            "",
            "",
        ));
        assert!(
            err.contains("intercept[0].terminate.certificates[0]") && err.contains(reason),
            "{reason}: {err}"
        );
    }
    let err = error_of(&policy(
        "",
        "",
        &format!(r#", "tls": {{ "ca": "{empty}" }}"#),
    ));
    assert!(
        err.contains("upstreams.app.tls.ca") && err.contains("no certificate"),
        "{err}"
    );
}

#[test]
fn a_chain_out_of_order_is_refused() {
    let files = Files::new("order");
    let (leaf, key, ca) = files.leaf("app", &["app.example.test"], FAR);
    // The CA first, then the leaf: the leaf's key does not match the first.
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&ca).unwrap(),
        std::fs::read_to_string(&leaf).unwrap()
    );
    let misordered = files.write("misordered.pem", &both);
    let err = error_of(&policy(
        &format!(r#", "terminate": {}"#, terminate(&misordered, &key)),
        "",
        "",
    ));
    assert!(err.contains("chain out of order"), "{err}");
}

#[test]
fn terminating_twice_and_tls_inside_a_parents_tls_are_refused() {
    let files = Files::new("twice");
    let (chain, key, ca) = files.leaf("app", &["app.example.test"], FAR);
    let err = error_of(&policy(
        &format!(r#", "terminate": {}"#, terminate(&chain, &key)),
        &format!(
            r#"{{ "match": {{ "sni": ["app.example.test"] }}, "upstream": "app", "terminate": {} }}"#,
            terminate(&chain, &key)
        ),
        "",
    ));
    assert!(
        err.contains("routes[0].terminate") && err.contains("terminates TLS already"),
        "{err}"
    );
    let err = error_of(&policy(
        "",
        &format!(
            r#"{{ "match": {{ "sni": ["app.example.test"] }}, "reject": true, "terminate": {} }}"#,
            terminate(&chain, &key)
        ),
        "",
    ));
    assert!(err.contains("a rejecting route relays nothing"), "{err}");
    for not_tls in [
        r#""host": ["app.example.test"]"#,
        r#""protocol": "http""#,
        r#""protocol": "other""#,
    ] {
        let err = error_of(&policy(
            "",
            &format!(
                r#"{{ "match": {{ {not_tls} }}, "upstream": "app", "terminate": {} }}"#,
                terminate(&chain, &key)
            ),
            "",
        ));
        assert!(
            err.contains("routes[0].terminate") && err.contains("not TLS"),
            "{not_tls}: {err}"
        );
    }
    let json = format!(
        r#"{{ "intercept": [ {{ "name": "web", "prefixes": ["192.0.2.0/24"], "ports": [443], "upstream": "up" }} ],
  "upstreams": {{ "up": {{ "parent": {{ "servers": ["198.51.100.1:3128"], "tls": {{ "ca": "{ca}" }} }},
                         "tls": {{ "ca": "{ca}" }} }} }} }}"#
    );
    let err = error_of(&json);
    assert!(
        err.contains("upstreams.up.tls") && err.contains("inside TLS to the parent"),
        "{err}"
    );
}

#[test]
fn a_connect_rule_offers_only_http_1_over_its_tls() {
    let files = Files::new("connect_alpn");
    let (chain, key, _) = files.leaf("proxy", &["proxy.example.test"], FAR);
    let rule = |alpn: &str| {
        format!(
            r#"{{ "intercept": [ {{ "name": "proxy", "connect": {{ "listen": ["192.0.2.1:3128"], "clients": ["198.51.100.0/24"] }},
                 "terminate": {{ "certificates": [ {{ "chain": "{chain}", "key": "{key}" }} ], "alpn": {alpn} }} }} ],
  "upstreams": {{}} }}"#
        )
    };
    let err = error_of(&rule(r#"["http/1.1", "h2"]"#));
    assert!(
        err.contains("intercept[0].terminate.alpn[1]") && err.contains("HTTP/1.x"),
        "{err}"
    );
    Policy::from_json(&rule(r#"["http/1.1"]"#)).unwrap();
}

#[test]
fn certificates_no_name_chooses_and_client_certificates_the_client_sends_are_warned_about() {
    let files = Files::new("nameless");
    let (named, named_key, ca) = files.leaf("named", &["app.example.test"], FAR);
    let (nameless, nameless_key, _) = files.leaf("nameless", &[], FAR);
    let both = format!(
        r#"{{ "certificates": [ {{ "chain": "{named}", "key": "{named_key}" }},
                                {{ "chain": "{nameless}", "key": "{nameless_key}" }} ] }}"#
    );
    let client = format!(
        r#", "tls": {{ "ca": "{ca}", "certificate": {{ "chain": "{named}", "key": "{named_key}" }} }}"#
    );
    let json = policy(&format!(r#", "terminate": {both}"#), "", &client);
    let warnings = Policy::from_json(&json).unwrap().warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("intercept[0].terminate.certificates[1]")
            && warnings[0].contains("has no DNS name"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with("upstreams.app.tls: a client certificate without \"server_name\""),
        "{warnings:?}"
    );
    // The first is the default, unless unknown names are refused.
    let alone = terminate(&nameless, &nameless_key);
    let json = policy(&format!(r#", "terminate": {alone}"#), "", "");
    assert_eq!(
        Policy::from_json(&json).unwrap().warnings(),
        Vec::<String>::new()
    );
    let refusing = alone.replacen('{', r#"{ "refuse_unknown_names": true,"#, 1);
    let json = policy(&format!(r#", "terminate": {refusing}"#), "", "");
    let warnings = Policy::from_json(&json).unwrap().warnings();
    assert!(
        warnings.len() == 1 && warnings[0].starts_with("intercept[0].terminate.certificates[0]"),
        "{warnings:?}"
    );
}

#[test]
fn expiring_certificates_and_uncovered_names_are_warned_about() {
    let files = Files::new("warn");
    let (chain, key, _) = files.leaf("old", &["old.example.test"], (2021, 1, 1));
    let json = policy(
        "",
        &format!(
            r#"{{ "match": {{ "sni": ["new.example.test"] }}, "upstream": "app", "terminate": {} }}"#,
            terminate(&chain, &key)
        ),
        "",
    );
    let warnings = Policy::from_json(&json).unwrap().warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("routes[0].terminate.certificates[0]")
                && w.ends_with("has expired")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("routes[0].match.sni: no certificate of routes[0].terminate")),
        "{warnings:?}"
    );
}
