//! `l4proxy check FILE` on the fixtures in tests/policies/: a valid policy
//! passes; each broken one fails with one line naming the file, the JSON path
//! (and line:column where the parser knows it) and a reason. Reasons are
//! matched on a key word only, so their wording may change.

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
    let path = fixture(name);
    assert!(path.exists(), "fixture {} missing", path.display());
    let out = Command::new(lab::daemon::binary())
        .arg("check")
        .arg(&path)
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
        &["port", "65535", "0"],
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
