//! Reading policies: what is accepted, and what is refused with which path,
//! position and reason.

mod examples;
mod intercept;
mod proxy_protocol;
mod routes;
mod transparency;

use super::Policy;

/// The message `json` is refused with.
fn error_of(json: &str) -> String {
    match Policy::from_json(json) {
        Ok(policy) => panic!("accepted: {policy:?}"),
        Err(err) => err.to_string(),
    }
}
