//! `l4proxy check FILE` on the fixtures in tests/policies/: a valid policy
//! passes; each broken one fails with one line per error naming the file,
//! the JSON path (and line:column where the parser knows it) and a reason;
//! `--strict` also fails on warnings. Reasons are matched on a key word
//! only, so their wording may change.

mod lab;

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/policies")
        .join(name)
}

struct Checked {
    file: String,
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(name: &str) -> Checked {
    check_with(name, &[])
}

fn check_with(name: &str, flags: &[&str]) -> Checked {
    check_in(name, flags, &[])
}

/// `l4proxy check` with `env` added to its environment.
fn check_in(name: &str, flags: &[&str], env: &[(&str, &std::path::Path)]) -> Checked {
    let path = fixture(name);
    assert!(path.exists(), "fixture {} missing", path.display());
    let out = Command::new(lab::daemon::binary())
        .arg("check")
        .args(flags)
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {} check: {e}", lab::daemon::binary()));
    Checked {
        file: path.display().to_string(),
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// 1-based number of the first line of the fixture containing `needle`.
fn line_of(name: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in fixture {name}"))
        + 1
}

/// Asserts a refusal: non-zero exit, exactly one line on stderr, which starts
/// with the file name (then `:LINE:COL` if `line` is given), names `path`
/// after that, and contains every one of `reasons` (case-insensitive).
fn assert_refused(name: &str, line: Option<usize>, path: &str, reasons: &[&str]) {
    let c = check(name);
    let ctx = format!(
        "l4proxy check {name}: exit {:?}\nstdout: {}\nstderr: {}",
        c.code, c.stdout, c.stderr
    );
    assert!(!c.ok, "should be refused; {ctx}");
    let lines: Vec<&str> = c.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr; {ctx}");
    let msg = lines[0];
    let rest = msg
        .strip_prefix(&c.file)
        .unwrap_or_else(|| panic!("message should start with the file name {}; {ctx}", c.file));
    let rest = match line {
        Some(line) => {
            let want = format!(":{line}:");
            let rest = rest
                .strip_prefix(&want)
                .unwrap_or_else(|| panic!("expected `{want}COL:` after the file name; {ctx}"));
            let (col, rest) = rest
                .split_once(':')
                .unwrap_or_else(|| panic!("expected a column after the line; {ctx}"));
            assert!(
                col.parse::<usize>().is_ok_and(|c| c > 0),
                "column {col:?} is not a positive number; {ctx}"
            );
            rest
        }
        None => rest
            .strip_prefix(':')
            .unwrap_or_else(|| panic!("expected `:` after the file name; {ctx}")),
    };
    let rest = rest.trim_start();
    if !path.is_empty() {
        assert!(
            rest.starts_with(path),
            "expected the JSON path {path:?} right after the location; {ctx}"
        );
    }
    let lower = rest.to_lowercase();
    for reason in reasons {
        assert!(
            lower.contains(&reason.to_lowercase()),
            "reason should mention {reason:?}; {ctx}"
        );
    }
}

/// What the daemon builds from the file is built too: an upstream's TLS
/// with the system's CA store, which here is empty (rustls-native-certs
/// reads SSL_CERT_FILE and SSL_CERT_DIR instead of the system's paths).
#[test]
fn tls_without_cas_is_refused() {
    let with_system = check("tls_no_system_cas.json");
    assert!(
        with_system.ok,
        "{}{}",
        with_system.stdout, with_system.stderr
    );
    let empty = lab::TempDir::new("no-cas");
    let c = check_in(
        "tls_no_system_cas.json",
        &[],
        &[
            ("SSL_CERT_FILE", std::path::Path::new("/dev/null")),
            ("SSL_CERT_DIR", empty.path()),
        ],
    );
    assert!(!c.ok, "should be refused: {}{}", c.stdout, c.stderr);
    assert_eq!(
        c.stderr.trim(),
        format!(
            "{}: upstreams.origin.tls: no CA certificates found in the system's store \
             (install Debian's ca-certificates, or name a CA file)",
            c.file
        )
    );
}

#[test]
fn valid_policy_passes() {
    let c = check("valid.json");
    assert!(
        c.ok,
        "valid.json refused (exit {:?}): {}{}",
        c.code, c.stdout, c.stderr
    );
    assert!(
        c.stderr.trim().is_empty(),
        "no complaint expected on stderr: {}",
        c.stderr
    );
}

#[test]
fn unknown_field_refused() {
    let line = line_of("unknown_field.json", "colour");
    assert_refused(
        "unknown_field.json",
        Some(line),
        "intercept[0]",
        &["unknown field", "colour"],
    );
}

#[test]
fn bad_prefix_refused() {
    let line = line_of("bad_prefix.json", "/33");
    assert_refused(
        "bad_prefix.json",
        Some(line),
        "intercept[0].prefixes[1]",
        &["prefix", "192.0.2.0/33"],
    );
}

#[test]
fn prefix_with_host_bits_refused() {
    let line = line_of("prefix_host_bits.json", "192.0.2.1/24");
    assert_refused(
        "prefix_host_bits.json",
        Some(line),
        "intercept[0].prefixes[0]",
        &["host bits", "192.0.2.0/24"],
    );
}

#[test]
fn port_zero_refused() {
    let line = line_of("port_zero.json", "[80, 0]");
    assert_refused(
        "port_zero.json",
        Some(line),
        "intercept[0].ports[1]",
        &["port must be 1-65535, got 0"],
    );
}

#[test]
fn port_70000_refused() {
    let line = line_of("port_70000.json", "70000");
    assert_refused(
        "port_70000.json",
        Some(line),
        "intercept[0].ports[1]",
        &["port", "65535", "70000"],
    );
}

#[test]
fn empty_file_refused() {
    assert_refused("empty.json", None, "", &["empty"]);
}

#[test]
fn upstream_loop_refused() {
    assert_refused(
        "loop.json",
        None,
        "upstreams.pool-a.servers[0]",
        &["loop", "192.0.2.5:80"],
    );
}

#[test]
fn every_broken_element_is_reported() {
    let name = "several_errors.json";
    let c = check(name);
    let ctx = format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        c.code, c.stdout, c.stderr
    );
    assert_eq!(c.code, Some(1), "{ctx}");
    let lines: Vec<&str> = c.stderr.lines().collect();
    // Each element's first error, in the order of the file; the second
    // rule's name is fine, its port is not.
    let expected = [
        ("192.0.2.1/24", "intercept[0].prefixes[0]", "host bits"),
        ("70000", "intercept[1].ports[0]", "65535"),
        ("5 minutes", "intercept[2].timeouts.idle", "duration"),
        ("api.*.example.com", "routes[0].match.sni[0]", "wildcard"),
        ("colour", "upstreams.pool.colour", "unknown field"),
    ];
    assert_eq!(lines.len(), expected.len(), "one line per error; {ctx}");
    for (line, (needle, path, reason)) in lines.iter().zip(expected) {
        let want = format!("{}:{}:", c.file, line_of(name, needle));
        let rest = line
            .strip_prefix(&want)
            .unwrap_or_else(|| panic!("expected {want}COL: for {path}; {ctx}"));
        let (col, rest) = rest.split_once(':').unwrap();
        assert!(col.parse::<usize>().is_ok_and(|c| c > 0), "{ctx}");
        assert!(rest.trim_start().starts_with(path), "{path}; {ctx}");
        assert!(rest.contains(reason), "{reason}; {ctx}");
    }
}

#[test]
fn comments_and_durations_with_units_pass() {
    let c = check("commented.json");
    assert!(c.ok, "exit {:?}: {}{}", c.code, c.stdout, c.stderr);
    assert!(c.stderr.trim().is_empty(), "{}", c.stderr);
    assert!(
        c.stdout.contains(": ok (1 intercept rules, 1 upstreams)"),
        "{}",
        c.stdout
    );
}

#[test]
fn warnings_fail_only_with_strict() {
    let lenient = check("shadowed_route.json");
    let ctx = format!("stdout: {}\nstderr: {}", lenient.stdout, lenient.stderr);
    assert!(lenient.ok, "{ctx}");
    assert!(
        lenient
            .stderr
            .starts_with(&format!("{}: warning: routes[1]", lenient.file)),
        "{ctx}"
    );
    assert!(lenient.stdout.contains(": ok"), "{ctx}");

    let strict = check_with("shadowed_route.json", &["--strict"]);
    let ctx = format!("stdout: {}\nstderr: {}", strict.stdout, strict.stderr);
    assert_eq!(strict.code, Some(1), "{ctx}");
    assert!(strict.stdout.is_empty(), "no ok line; {ctx}");
    let lines: Vec<&str> = strict.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{ctx}");
    assert!(lines[0].contains("warning: routes[1]"), "{ctx}");
    assert_eq!(
        lines[1],
        format!("{}: refused: 1 warning and --strict", strict.file),
        "{ctx}"
    );

    let clean = check_with("valid.json", &["--strict"]);
    assert!(clean.ok, "{}{}", clean.stdout, clean.stderr);
}

/// A rule whose every prefix and port another takes first (single ports
/// win over a range) is named, and
/// counts as a warning for `--strict`.
#[test]
fn a_rule_that_never_matches_is_a_warning() {
    let lenient = check("shadowed_rule.json");
    let ctx = format!("stdout: {}\nstderr: {}", lenient.stdout, lenient.stderr);
    assert!(lenient.ok, "{ctx}");
    assert_eq!(
        lenient.stderr.trim_end(),
        format!(
            "{}: warning: intercept[1]: never matches: rules that win over rule \"web-range\" \
             (a more specific prefix, or narrower ports) take every destination and port it names",
            lenient.file
        ),
        "{ctx}"
    );
    let strict = check_with("shadowed_rule.json", &["--strict"]);
    assert_eq!(strict.code, Some(1), "{}", strict.stderr);
}
