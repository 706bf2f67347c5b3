//! Which intercept rule a connection belongs to: a pure decision, no I/O.
//! TODO(helper): implement precedence.
