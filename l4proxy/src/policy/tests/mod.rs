//! Reading policies: what is accepted, and what is refused with which path,
//! position and reason.

mod balance;
mod connect;
mod examples;
mod friendly;
mod intercept;
mod limits;
mod proxy_protocol;
mod routes;
mod tls;
mod transparency;

use super::Policy;

/// `example` with the first `from` replaced by `to` (which must be there).
fn edited(example: &str, from: &str, to: &str) -> String {
    assert!(example.contains(from), "{from:?} is not in the example");
    example.replacen(from, to, 1)
}

/// The message `example`, edited, is refused with.
fn error_in(example: &str, from: &str, to: &str) -> String {
    error_of(&edited(example, from, to))
}

/// The message `json` is refused with.
fn error_of(json: &str) -> String {
    match Policy::from_json(json) {
        Ok(policy) => panic!("accepted: {policy:?}"),
        Err(err) => err.to_string(),
    }
}
