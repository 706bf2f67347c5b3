//! A client's share of something scarce that its connections wait for (name
//! look-ups, password checks): a client holds at most so many turns at a
//! time, and past that waits for one of its own, so that one client cannot
//! take every turn and leave the others waiting. A client is its address,
//! an IPv6 one its /64 (what one host usually holds).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, LazyLock, Mutex, MutexGuard},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Each client's turns, and how many of its connections hold or wait for
/// one (the entry goes when none does).
type Clients = HashMap<IpAddr, (Arc<Semaphore>, usize)>;

/// Turns of at most `per_client` at a time for each client.
pub struct ClientShare {
    per_client: usize,
    clients: LazyLock<Mutex<Clients>>,
}

impl ClientShare {
    pub const fn new(per_client: usize) -> ClientShare {
        ClientShare {
            per_client,
            clients: LazyLock::new(Mutex::default),
        }
    }

    /// One of `client`'s turns, once it has one free.
    pub async fn turn(&self, client: IpAddr) -> ClientTurn<'_> {
        let client = match client.to_canonical() {
            IpAddr::V6(ip) => {
                let [a, b, c, d, ..] = ip.segments();
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
            ip => ip,
        };
        let turns = {
            let mut clients = self.clients();
            let (turns, users) = clients
                .entry(client)
                .or_insert_with(|| (Arc::new(Semaphore::new(self.per_client)), 0));
            *users += 1;
            turns.clone()
        };
        // Counted from here: given up while waiting, it is dropped too.
        let mut turn = ClientTurn {
            share: self,
            client,
            permit: None,
        };
        turn.permit = turns.acquire_owned().await.ok();
        turn
    }

    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One of a client's turns (or the wait for one).
pub struct ClientTurn<'a> {
    share: &'a ClientShare,
    client: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for ClientTurn<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut clients = self.share.clients();
        if let Some((_, users)) = clients.get_mut(&self.client) {
            *users -= 1;
            if *users == 0 {
                clients.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_holds_at_most_its_share_of_turns() {
        let share = ClientShare::new(8);
        let client: IpAddr = "2001:db8:1::7".parse().unwrap();
        let neighbour: IpAddr = "2001:db8:1::8".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(share.turn(client).await);
        }
        // Its /64 is the same client: no turn left.
        let more = tokio::time::timeout(Duration::from_millis(50), share.turn(neighbour));
        assert!(more.await.is_err(), "a ninth turn for the same /64");
        // Another client is not held up.
        let other = tokio::time::timeout(
            Duration::from_millis(50),
            share.turn("192.0.2.7".parse().unwrap()),
        );
        drop(other.await.expect("another client's turn"));
        // A turn given back goes to the client's next wait ...
        let next = {
            let mut waiting = std::pin::pin!(share.turn(client));
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            held.pop();
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("the client's turn given back")
        };
        // ... and the entry goes with the client's last turn, also when a
        // wait for one was given up.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), share.turn(client));
        assert!(gave_up.await.is_err());
        drop(next);
        held.clear();
        assert!(share.clients().is_empty());
    }
}
