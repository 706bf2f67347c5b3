//! Where a connection goes: pure decisions, no I/O.
//!
//! Two steps: [`match_rule`] finds the intercept rule by destination alone
//! (the choice the kernel made when it steered the connection); [`decide`]
//! then walks the policy's routes to an upstream or a refusal, asking for the
//! client's first bytes only when a route that applies needs them.

mod decide;
mod intercept;

pub use decide::{Connection, Decision, Hello, Why, decide};
pub use intercept::{Specificity, match_rule, specificity};
