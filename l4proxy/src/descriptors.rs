//! The daemon's descriptor budget: every relayed connection holds two
//! sockets, and pipes, listeners, netlink sockets and the kernel programs
//! need their own. A daemon whose open-files limit cannot cover
//! `--max-connections` would complete handshakes it cannot accept, and
//! leave those clients waiting in the backlog until they give up; so the
//! limit is raised as far as it goes, and checked at start-up.

use crate::{health, lookup, relay, upstream};

/// Descriptors one relayed connection holds: the client's socket and the
/// upstream's.
const PER_CONNECTION: u64 = 2;

/// Descriptors kept for everything else: the splice pipes (two each), the
/// reset watches of half-closed TLS connections, the name look-ups'
/// sockets, Happy Eyeballs' second attempts and the health checks in
/// flight, and spare for netlink sockets, BPF maps, programs and links, the
/// guard's pipe, standard streams. Listeners and the workers' runtimes come
/// on top ([`Reserve`]).
const RESERVE: u64 = 2 * relay::MAX_PIPES as u64
    + relay::MAX_RESET_WATCHES as u64
    + lookup::MAX_RESOLVING as u64
    + upstream::MAX_SECOND_ATTEMPTS as u64
    + health::MAX_CHECKS as u64
    + 256;

/// Descriptors each worker holds: its runtime's epoll and wake-up
/// descriptors, its steered listener of each family with the copy the
/// installation keeps (to hand over in an upgrade), and the netlink socket
/// CONNECT tunnels ask the kernel's routes on.
const PER_WORKER: u64 = 2 + 2 * 2 + 1;

/// What is kept beside the connections, for `workers` workers and
/// `connect_addresses` addresses CONNECT rules listen on (each a listener
/// per worker, and its copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserve(u64);

impl Reserve {
    pub fn new(workers: usize, connect_addresses: usize) -> Self {
        let per_worker = PER_WORKER + 2 * connect_addresses as u64;
        Reserve(RESERVE + workers as u64 * per_worker)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("reading the open-files limit: {0}")]
    Read(std::io::Error),
    #[error(
        "the open-files limit ({limit}) covers at most {fits} connections \
         ({PER_CONNECTION} descriptors each, plus {reserve} for pipes, listeners, the \
         workers and the kernel programs); --max-connections {asked} needs {needs}: raise \
         the limit (LimitNOFILE= in a systemd unit, ulimit -n in a shell) or lower \
         --max-connections"
    )]
    TooLow {
        limit: u64,
        fits: u64,
        reserve: u64,
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
pub fn max_connections(asked: Option<usize>, reserve: Reserve) -> Result<usize, DescriptorError> {
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
    let max = fit(limit, asked, reserve)?;
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
fn fit(
    limit: u64,
    asked: Option<usize>,
    Reserve(reserve): Reserve,
) -> Result<usize, DescriptorError> {
    let fits = limit.saturating_sub(reserve) / PER_CONNECTION;
    let wanted = asked.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    if wanted as u64 <= fits {
        return Ok(wanted);
    }
    let too_low = |asked: usize| DescriptorError::TooLow {
        limit,
        fits,
        reserve,
        asked,
        needs: (asked as u64)
            .saturating_mul(PER_CONNECTION)
            .saturating_add(reserve),
    };
    match asked {
        Some(asked) => Err(too_low(asked)),
        // A default lowered to nothing is no default.
        None if fits == 0 => Err(too_low(DEFAULT_MAX_CONNECTIONS)),
        None => Ok(fits as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two workers, no CONNECT rule: the bench's and the lab's daemon.
    const TWO_WORKERS: Reserve = Reserve(RESERVE + 2 * PER_WORKER);

    #[test]
    fn what_fits_is_taken_as_asked() {
        assert_eq!(
            fit(1 << 20, None, TWO_WORKERS).unwrap(),
            DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(fit(1 << 20, Some(100), TWO_WORKERS).unwrap(), 100);
        assert_eq!(
            fit(TWO_WORKERS.0 + 200, Some(100), TWO_WORKERS).unwrap(),
            100
        );
    }

    #[test]
    fn a_default_that_does_not_fit_is_lowered() {
        // This machine's limit: 20 000 descriptors.
        assert_eq!(Reserve::new(2, 0), TWO_WORKERS);
        assert_eq!(TWO_WORKERS.0, 1102);
        assert_eq!(fit(20_000, None, TWO_WORKERS).unwrap(), 9_449);
    }

    #[test]
    fn workers_and_connect_listeners_are_kept_for() {
        // 64 workers with two CONNECT addresses: 704 listeners, runtime and
        // netlink descriptors beside the fixed reserve.
        let reserve = Reserve::new(64, 2);
        assert_eq!(reserve.0, RESERVE + 704);
        assert_eq!(fit(4096, None, reserve).unwrap(), (4096 - 1088 - 704) / 2);
    }

    #[test]
    fn an_asked_number_that_does_not_fit_is_refused() {
        let refused = fit(TWO_WORKERS.0 + 199, Some(100), TWO_WORKERS).unwrap_err();
        assert!(
            matches!(refused, DescriptorError::TooLow { fits: 99, needs, reserve: 1102, .. } if needs == 1102 + 200),
            "{refused}"
        );
        assert!(fit(10, None, TWO_WORKERS).is_err());
    }
}
