//! The addresses of a proxied connection, as distinct types so that a client
//! address is never passed where an upstream is meant.

use std::{fmt, net::SocketAddr};

macro_rules! addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub SocketAddr);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

addr_newtype!(
    /// Where the connection came from (the accepted socket's peer).
    ClientAddr
);
addr_newtype!(
    /// Where the client meant to go: with `sk_lookup` steering this is simply the
    /// accepted socket's local address.
    OrigDstAddr
);
addr_newtype!(
    /// The server the proxy connects to on the client's behalf.
    UpstreamAddr
);
