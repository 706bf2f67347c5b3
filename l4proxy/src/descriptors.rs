//! The daemon's descriptor budget: every relayed connection holds two
//! sockets, and pipes, listeners, netlink sockets and the kernel programs
//! need their own. A daemon whose open-files limit cannot cover
//! `--max-connections` would complete handshakes it cannot accept, and
//! leave those clients waiting in the backlog until they give up; so the
//! limit is raised as far as it goes, and checked at start-up.

use crate::{lookup, relay, upstream};

/// Descriptors one relayed connection holds: the client's socket and the
/// upstream's.
const PER_CONNECTION: u64 = 2;

/// Descriptors kept for everything else: the splice pipes (two each), the
/// reset watches of half-closed TLS connections, the name look-ups'
/// sockets and Happy Eyeballs' second attempts, and spare for listeners,
/// netlink sockets, BPF maps, programs and links, the guard's pipe,
/// standard streams.
const RESERVE: u64 = 2 * relay::MAX_PIPES as u64
    + relay::MAX_RESET_WATCHES as u64
    + lookup::MAX_RESOLVING as u64
    + upstream::MAX_SECOND_ATTEMPTS as u64
    + 256;

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("reading the open-files limit: {0}")]
    Read(std::io::Error),
    #[error(
        "the open-files limit ({limit}) covers at most {fits} connections \
         ({PER_CONNECTION} descriptors each, plus {RESERVE} for pipes, listeners and \
         the kernel programs); --max-connections {asked} needs {needs}: raise the limit \
         (LimitNOFILE= in a systemd unit, ulimit -n in a shell) or lower --max-connections"
    )]
    TooLow {
        limit: u64,
        fits: u64,
        asked: usize,
        needs: u64,
    },
}

/// The default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16384;

/// How many connections the daemon may relay at once: `asked` (the flag, if
/// given) or the default. Raises the soft open-files limit to the hard one
/// first. A default that does not fit is lowered to what does, with a
/// warning; a number the operator gave is refused.
pub fn max_connections(asked: Option<usize>) -> Result<usize, DescriptorError> {
    let (soft, hard) = rlimit::Resource::NOFILE
        .get()
        .map_err(DescriptorError::Read)?;
    let limit = if soft < hard {
        match rlimit::Resource::NOFILE.set(hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "raising the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    let max = fit(limit, asked)?;
    if max < asked.unwrap_or(DEFAULT_MAX_CONNECTIONS) {
        tracing::warn!(
            open_files_limit = limit,
            max_connections = max,
            "the default --max-connections ({DEFAULT_MAX_CONNECTIONS}) does not fit the \
             open-files limit: lowered; raise the limit (LimitNOFILE=, ulimit -n) for more"
        );
    }
    Ok(max)
}

/// The connections `limit` descriptors allow, given what was asked.
fn fit(limit: u64, asked: Option<usize>) -> Result<usize, DescriptorError> {
    let fits = limit.saturating_sub(RESERVE) / PER_CONNECTION;
    let wanted = asked.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if wanted as u64 <= fits {
        return Ok(wanted);
    }
    match asked {
        Some(asked) => Err(DescriptorError::TooLow {
            limit,
            fits,
            asked,
            needs: (asked as u64)
                .saturating_mul(PER_CONNECTION)
                .saturating_add(RESERVE),
        }),
        // A default lowered to nothing is no default.
        None if fits == 0 => Err(DescriptorError::TooLow {
            limit,
            fits,
            asked: DEFAULT_MAX_CONNECTIONS,
            needs: DEFAULT_MAX_CONNECTIONS as u64 * PER_CONNECTION + RESERVE,
        }),
        None => Ok(fits as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_fits_is_taken_as_asked() {
        assert_eq!(fit(1 << 20, None).unwrap(), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(fit(1 << 20, Some(100)).unwrap(), 100);
        assert_eq!(fit(RESERVE + 200, Some(100)).unwrap(), 100);
    }

    #[test]
    fn a_default_that_does_not_fit_is_lowered() {
        // This machine's limit: 20 000 descriptors.
        assert_eq!(fit(20_000, None).unwrap(), 9_520);
    }

    #[test]
    fn an_asked_number_that_does_not_fit_is_refused() {
        let refused = fit(RESERVE + 199, Some(100)).unwrap_err();
        assert!(
            matches!(refused, DescriptorError::TooLow { fits: 99, needs, .. } if needs == RESERVE + 200),
            "{refused}"
        );
        assert!(fit(10, None).is_err());
    }
}
