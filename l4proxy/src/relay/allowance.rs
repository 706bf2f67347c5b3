//! Descriptors the relay opens beyond each connection's two sockets (splice
//! pipes, the reset watch's duplicates), each kind bounded: the daemon's
//! descriptor budget counts every bound, so that they never take the
//! descriptors accepting and connecting need.

use std::sync::atomic::{AtomicUsize, Ordering};

/// How many of a kind may be open at once, and how many are.
pub struct Allowance {
    open: AtomicUsize,
    max: usize,
}

impl Allowance {
    pub const fn new(max: usize) -> Allowance {
        Allowance {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a place for one more, if fewer than the most are open; the
    /// taker gives it back ([`Allowance::give_back`]) when it closes it.
    /// (No guard is handed out: a pipe's would grow every connection's task.)
    pub fn take(&self) -> bool {
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |open| {
                (open < self.max).then_some(open + 1)
            })
            .is_ok()
    }

    /// Gives back a place [`Allowance::take`] gave.
    pub fn give_back(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// How many are open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_up_to_the_most_and_back() {
        let two = Allowance::new(2);
        assert!(two.take() && two.take(), "two places");
        assert!(!two.take(), "a third while two are open");
        two.give_back();
        assert!(two.take(), "a place given back is free again");
        assert_eq!(two.open(), 2);
        two.give_back();
        two.give_back();
        assert_eq!(two.open(), 0);
    }
}
