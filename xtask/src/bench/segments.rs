//! TCP segments the proxy host sent and received, from its namespace's
//! `/proc/net/snmp` (read through a proxy's process, which lives in it).
//! Over a run in which only one proxy is running, the difference is that
//! proxy's packets: the direct path's are forwarded there, not counted as
//! TCP. What a proxy's own code can save in the kernel is system calls and
//! these.

/// Segments counted so far in one namespace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segments {
    pub sent: u64,
    pub received: u64,
}

impl Segments {
    /// What was counted since `before`.
    pub fn since(self, before: Segments) -> Segments {
        Segments {
            sent: self.sent - before.sent,
            received: self.received - before.received,
        }
    }
}

/// The counts of the namespace `pid` lives in; `None` if it is gone.
pub fn of_namespace(pid: u32) -> Option<Segments> {
    parse(&std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?)
}

/// `InSegs` and `OutSegs` from the `Tcp:` lines (a header line, then the
/// values in the same order).
fn parse(snmp: &str) -> Option<Segments> {
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let field = |wanted: &str| {
        let k = names.split_whitespace().position(|name| name == wanted)?;
        values.split_whitespace().nth(k)?.parse().ok()
    };
    Some(Segments {
        received: field("InSegs")?,
        sent: field("OutSegs")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_from_the_tcp_lines() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails \
                    EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors\n\
                    Tcp: 1 200 120000 -1 10 12 0 1 2 1234 5678 3 0 4 0\n\
                    Udp: InDatagrams\nUdp: 7\n";
        assert_eq!(
            parse(snmp),
            Some(Segments {
                received: 1234,
                sent: 5678
            })
        );
        assert_eq!(parse("Ip: Forwarding\nIp: 1\n"), None);
    }

    #[test]
    fn this_namespace_has_counts() {
        assert!(of_namespace(std::process::id()).is_some());
    }
}
