//! `Policy::from_json` on arbitrary UTF-8 text: no panic, an accepted
//! policy's warnings and a refused one's message can be made, and what it
//! accepts does not depend on layout (the same JSON written compactly gives
//! the same policy). Text that is JSON is also parsed again with one node
//! removed or replaced by another type or an edge value: the rest of a valid
//! policy stays valid, so the change reaches the checks deep inside it.
#![no_main]

use l4proxy::policy::Policy;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// What a node can be replaced with: each JSON type, and values at the edges
/// of what a policy takes (ports, port ranges, prefixes, names).
const REPLACEMENTS: &[&str] = &[
    "null",
    "true",
    "0",
    "-1",
    "65535",
    "65536",
    "1.5",
    "18446744073709551616",
    r#""""#,
    r#""*""#,
    r#""1-0""#,
    r#""0-65535""#,
    r#""0.0.0.0/0""#,
    r#""::/0""#,
    r#""::ffff:192.0.2.1""#,
    r#""*.""#,
    "[]",
    "{}",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let accepted = parse(text);
    let Ok(mut value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    if let Some(policy) = accepted {
        let compact = value.to_string();
        assert_eq!(
            parse(&compact).as_ref(),
            Some(&policy),
            "the same policy written compactly: {compact}"
        );
    }
    mutate(&mut value, fnv1a(data));
    parse(&value.to_string());
});

/// The policy `text` is, if accepted, once its warnings could be made; a
/// refusal must say something.
fn parse(text: &str) -> Option<Policy> {
    match Policy::from_json(text) {
        Ok(policy) => {
            policy.warnings();
            Some(policy)
        }
        Err(refused) => {
            assert!(
                !refused.to_string().is_empty(),
                "a refusal without a reason"
            );
            None
        }
    }
}

/// Picks a node of `root` (pre-order) and what to do with it from `choice`:
/// put one of [`REPLACEMENTS`] in its place, or remove it.
fn mutate(root: &mut Value, choice: u64) {
    let nodes = count(root) as u64;
    let target = (choice % nodes) as usize;
    let action = (choice / nodes) as usize % (REPLACEMENTS.len() + 1);
    let with = REPLACEMENTS
        .get(action)
        .map(|json| serde_json::from_str(json).expect("a replacement is JSON"));
    if let Change::Remove = change(root, target, &mut 0, with.as_ref()) {
        *root = Value::Null;
    }
}

fn count(node: &Value) -> usize {
    1 + match node {
        Value::Array(items) => items.iter().map(count).sum(),
        Value::Object(fields) => fields.values().map(count).sum(),
        _ => 0,
    }
}

enum Change {
    Done,
    /// The parent is to remove this node.
    Remove,
    NotYet,
}

/// Walks `node` in pre-order, numbering nodes from `seen`; node `target` is
/// replaced by `with`, or, with none, removed.
fn change(node: &mut Value, target: usize, seen: &mut usize, with: Option<&Value>) -> Change {
    if *seen == target {
        return match with {
            Some(value) => {
                *node = value.clone();
                Change::Done
            }
            None => Change::Remove,
        };
    }
    *seen += 1;
    match node {
        Value::Array(items) => {
            for i in 0..items.len() {
                match change(&mut items[i], target, seen, with) {
                    Change::NotYet => {}
                    Change::Remove => {
                        items.remove(i);
                        return Change::Done;
                    }
                    Change::Done => return Change::Done,
                }
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                match change(field, target, seen, with) {
                    Change::NotYet => {}
                    Change::Remove => {
                        let key = key.clone();
                        fields.remove(&key);
                        return Change::Done;
                    }
                    Change::Done => return Change::Done,
                }
            }
        }
        _ => {}
    }
    Change::NotYet
}

/// A hash of the input, so that each input always makes the same change.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
