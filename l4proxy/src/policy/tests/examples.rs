//! Every policy in `examples/` is one an operator may copy: it must load, and
//! without a warning.

use std::{fs, path::Path};

use crate::policy::Policy;

#[test]
fn every_example_loads_without_warnings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = Vec::new();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let file = entry.unwrap().path();
        if file.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let policy = Policy::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let warnings = crate::intercept::rules::warnings(&policy);
        assert_eq!(warnings, Vec::<String>::new(), "{}", file.display());
        checked.push(file.file_name().unwrap().to_string_lossy().into_owned());
    }
    // The scenarios docs/policy.md walks through.
    for name in [
        "demo.json",
        "demo-gateway.json",
        "demo-bridged.json",
        "dual-stack.json",
        "http-host.json",
        "tls-sni.json",
        "web-combined.json",
        "explicit.json",
        "inbound-transparent.json",
        "outbound-transparent.json",
        "fully-transparent.json",
        "proxy-protocol.json",
        "balanced.json",
        "bridged.json",
    ] {
        assert!(
            checked.iter().any(|c| c == name),
            "{name} missing from examples/"
        );
    }
}
