//! Each behaviour is checked on every path: splice through pooled pipes,
//! the buffer copy a direction falls back to when no pipe can be had, and
//! the buffered relay of connections with a TLS side (driven here over
//! plain TCP: what it promises of half-closes, resets and deadlines does
//! not depend on TLS).

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use super::*;

#[derive(Clone, Copy, Debug)]
enum Path {
    Splice,
    Copy,
    Buffered,
}

const PATHS: [Path; 3] = [Path::Splice, Path::Copy, Path::Buffered];

/// The pipe source of the copy path: every pipe fails as it would at EMFILE.
fn no_pipes() -> io::Result<Pipe> {
    Err(io::Error::from_raw_os_error(libc::EMFILE))
}

/// A relay under test between a client and a server, both over loopback.
struct Lab {
    /// The client's socket (the relay holds the accepted end).
    client: TcpStream,
    /// The server's accepted socket (the relay holds the connecting end).
    server: TcpStream,
    shutdown: CancellationToken,
    relay: JoinHandle<Relayed>,
}

/// A connected pair: (connecting end, accepted end).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connecting = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    (connecting, accepted)
}

impl Lab {
    async fn start(path: Path) -> Lab {
        Lab::with_deadlines(path, Deadlines::default()).await
    }

    async fn with_deadlines(path: Path, deadlines: Deadlines) -> Lab {
        if let Path::Splice = path {
            // Else every burst would quietly take the copy path.
            pipe::give_back(pipe::take().expect("a pipe for the splice path"));
        }
        let (client, accepted) = pair().await;
        let (upstream, server) = pair().await;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let relay = tokio::spawn(async move {
            match path {
                Path::Splice => {
                    relay_with(accepted, upstream, deadlines, &token, &pipe::take).await
                }
                Path::Copy => relay_with(accepted, upstream, deadlines, &token, &no_pipes).await,
                Path::Buffered => {
                    buffered::relay(
                        Stream::Tcp(accepted),
                        Stream::Tcp(upstream),
                        deadlines,
                        &token,
                    )
                    .await
                }
            }
        });
        Lab {
            client,
            server,
            shutdown,
            relay,
        }
    }
}

/// Waits for the relay's result.
async fn finish(relay: JoinHandle<Relayed>, path: Path) -> Relayed {
    // A hang guard, not a timing assertion.
    tokio::time::timeout(Duration::from_secs(30), relay)
        .await
        .unwrap_or_else(|_| panic!("{path:?}: relay did not end"))
        .unwrap()
}

fn random_bytes(len: usize, mut state: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes everything, half-closes, and reads to EOF at the same time.
async fn exchange(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    read.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    got
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn reset(stream: TcpStream) {
    // Linger 0: close sends a reset instead of a FIN.
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

#[tokio::test]
async fn moves_megabytes_both_ways_byte_exact() {
    const SIZE: usize = 3 << 20;
    for path in PATHS {
        let Lab {
            client,
            server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        let up = random_bytes(SIZE, 1);
        let down = random_bytes(SIZE + 12_345, 2);
        let (at_server, at_client) = tokio::join!(
            tokio::spawn(exchange(server, down.clone())),
            tokio::spawn(exchange(client, up.clone())),
        );
        let relayed = finish(relay, path).await;
        assert_eq!(sha256(&at_server.unwrap()), sha256(&up), "{path:?}: upload");
        assert_eq!(
            sha256(&at_client.unwrap()),
            sha256(&down),
            "{path:?}: download"
        );
        assert!(
            matches!(relayed.outcome, Outcome::Closed),
            "{path:?}: {relayed:?}"
        );
        assert_eq!(relayed.from_client, up.len() as u64, "{path:?}");
        assert_eq!(relayed.from_upstream, down.len() as u64, "{path:?}");
    }
}

/// One side sends `first` and half-closes; the other reads to EOF, then sends
/// `answer` and closes; both must arrive whole, and the relay end cleanly.
async fn half_close_then_answer(
    path: Path,
    client_first: bool,
    first: &[u8],
    answer: &[u8],
) -> Relayed {
    let Lab {
        mut client,
        mut server,
        shutdown: _,
        relay,
    } = Lab::start(path).await;
    let (speaker, listener) = if client_first {
        (&mut client, &mut server)
    } else {
        (&mut server, &mut client)
    };
    speaker.write_all(first).await.unwrap();
    speaker.shutdown().await.unwrap();
    let mut got = Vec::new();
    listener.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, first, "{path:?}");
    listener.write_all(answer).await.unwrap();
    listener.shutdown().await.unwrap();
    let mut got = Vec::new();
    speaker.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, answer, "{path:?}");
    let relayed = finish(relay, path).await;
    assert!(
        matches!(relayed.outcome, Outcome::Closed),
        "{path:?}: {relayed:?}"
    );
    relayed
}

#[tokio::test]
async fn client_half_close_reaches_the_server_and_the_answer_still_flows() {
    for path in PATHS {
        let relayed = half_close_then_answer(path, true, b"request", b"response").await;
        assert_eq!((relayed.from_client, relayed.from_upstream), (7, 8));
    }
}

#[tokio::test]
async fn server_half_close_reaches_the_client_and_the_upload_still_flows() {
    for path in PATHS {
        let relayed = half_close_then_answer(path, false, b"banner", b"upload after EOF").await;
        assert_eq!((relayed.from_client, relayed.from_upstream), (16, 6));
    }
}

/// Reads until the connection ends, which must be with a reset.
async fn assert_reset(stream: &mut TcpStream, path: Path) {
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("{path:?}: connection left open"));
    match ended {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "{path:?}: ended with {other:?} after {} bytes, not a reset",
            rest.len()
        ),
    }
}

#[tokio::test]
async fn upstream_reset_ends_both_sides_with_counts() {
    for path in PATHS {
        let Lab {
            mut client,
            mut server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        client.write_all(b"abc").await.unwrap();
        let mut got = [0u8; 3];
        server.read_exact(&mut got).await.unwrap();
        reset(server);
        // The client sees what a direct connection would have shown it.
        assert_reset(&mut client, path).await;
        let relayed = finish(relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::UpstreamError(_)),
            "{path:?}: {relayed:?}"
        );
        assert_eq!((relayed.from_client, relayed.from_upstream), (3, 0));
    }
}

#[tokio::test]
async fn client_reset_ends_both_sides_with_counts() {
    for path in PATHS {
        let Lab {
            mut client,
            mut server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        server.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        reset(client);
        assert_reset(&mut server, path).await;
        let relayed = finish(relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::ClientError(_)),
            "{path:?}: {relayed:?}"
        );
        assert_eq!((relayed.from_client, relayed.from_upstream), (0, 5));
    }
}

#[tokio::test]
async fn cancellation_ends_an_open_relay() {
    for path in PATHS {
        let mut lab = Lab::start(path).await;
        lab.client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        lab.server.read_exact(&mut got).await.unwrap();
        lab.shutdown.cancel();
        let relayed = finish(lab.relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::ShutDown),
            "{path:?}: {relayed:?}"
        );
        assert_eq!((relayed.from_client, relayed.from_upstream), (4, 0));
    }
}

#[tokio::test]
async fn an_idle_connection_is_reset_on_both_sides_at_the_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(400);
    for path in PATHS {
        let mut lab = Lab::with_deadlines(
            path,
            Deadlines {
                idle: Some(IDLE),
                end: None,
            },
        )
        .await;
        lab.client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        lab.server.read_exact(&mut got).await.unwrap();
        let quiet_since = tokio::time::Instant::now();
        let relayed = finish(lab.relay, path).await;
        let waited = quiet_since.elapsed();
        assert!(
            matches!(relayed.outcome, Outcome::IdleTimeout(IDLE)),
            "{path:?}: {relayed:?}"
        );
        // Between the timeout and an eighth more (plus scheduling).
        assert!(
            waited >= IDLE - IDLE / super::IDLE_LOOKS,
            "{path:?}: after {waited:?}"
        );
        assert_reset(&mut lab.client, path).await;
        assert_reset(&mut lab.server, path).await;
    }
}

#[tokio::test]
async fn bytes_that_keep_moving_are_not_cut_by_the_idle_timeout_but_the_lifetime_ends_them() {
    // A byte every 100 ms: ten times within the idle timeout, so a busy
    // machine's scheduling delays do not look like silence.
    const IDLE: Duration = Duration::from_millis(1000);
    const LIFETIME: Duration = Duration::from_millis(2500);
    for path in PATHS {
        let started = tokio::time::Instant::now();
        let Lab {
            mut client,
            mut server,
            shutdown: _,
            relay,
        } = Lab::with_deadlines(
            path,
            Deadlines {
                idle: Some(IDLE),
                end: Some((started + LIFETIME, LIFETIME)),
            },
        )
        .await;
        // A byte every 100 ms, each way in turn.
        let mut moved = 0;
        let ended = loop {
            let (from, to) = if moved % 2 == 0 {
                (&mut client, &mut server)
            } else {
                (&mut server, &mut client)
            };
            if from.write_all(b"x").await.is_err() {
                break None;
            }
            let mut byte = [0u8; 1];
            match to.read(&mut byte).await {
                Ok(1) => moved += 1,
                other => break Some(other),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let relayed = finish(relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::LifetimeOver(LIFETIME)),
            "{path:?}: {relayed:?} ({ended:?})"
        );
        // It ran well past the idle timeout, to the lifetime.
        assert!(moved >= 15, "{path:?}: only {moved} bytes moved");
        assert!(started.elapsed() >= LIFETIME, "{path:?}");
    }
}

#[tokio::test]
async fn a_fin_stays_a_fin_when_one_side_resets_the_other_way() {
    // The server half-closes (a FIN reaches the client), then resets:
    // the client sees the clean EOF first, then, writing, the reset.
    for path in PATHS {
        let Lab {
            mut client,
            mut server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye", "{path:?}");
        reset(server);
        let relayed = finish(relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::UpstreamError(_)),
            "{path:?}: {relayed:?}"
        );
        // Reset: writes to the client's connection now fail.
        let mut failed = None;
        for _ in 0..50 {
            if let Err(e) = client.write_all(b"more").await {
                failed = Some(e.kind());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            matches!(
                failed,
                Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
            ),
            "{path:?}: {failed:?}"
        );
    }
}

#[tokio::test]
async fn a_reset_is_passed_on_while_its_direction_waits_for_a_full_destination() {
    // The server reads nothing: the client's bytes fill the server's
    // socket, the relay's and the client's own; the relay waits to write,
    // reading nothing from the client. The client's reset must still end
    // the relay and reach the server, which has not read.
    // (Not the buffered path: tokio's bidirectional copy reads no more
    // from a side whose bytes wait to be written.)
    for path in [Path::Splice, Path::Copy] {
        let Lab {
            client,
            server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        // Bounded: the buffers on the way hold a few MiB at most.
        while written < 256 << 20 {
            match tokio::time::timeout(Duration::from_millis(300), client.writable()).await {
                Err(_) => break,
                Ok(ready) => ready.unwrap(),
            }
            match client.try_write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{path:?}: {e}"),
            }
        }
        assert!(written < 256 << 20, "{path:?}: the writes never blocked");
        reset(client);
        let relayed = finish(relay, path).await;
        assert!(
            matches!(relayed.outcome, Outcome::ClientError(_)),
            "{path:?}: {relayed:?}"
        );
        let ready = tokio::time::timeout(Duration::from_secs(10), server.ready(Interest::ERROR))
            .await
            .unwrap_or_else(|_| panic!("{path:?}: the server never got the reset"))
            .unwrap();
        assert!(ready.is_error(), "{path:?}: {ready:?}");
    }
}

/// Segments `stream` has received.
fn segments_in(stream: &TcpStream) -> u32 {
    crate::tcp_info::of(stream).tcpi_segs_in
}

#[tokio::test]
async fn a_last_reply_and_its_end_reach_the_client_in_one_segment() {
    // The buffered relay's TLS side sends close_notify before its FIN.
    for path in [Path::Splice, Path::Copy] {
        let Lab {
            mut client,
            mut server,
            shutdown: _,
            relay,
        } = Lab::start(path).await;
        let before = segments_in(&client);
        // Both are sent before the relay runs again (this test's runtime
        // has one thread), so it reads the reply with the end already seen.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply", "{path:?}");
        assert_eq!(
            segments_in(&client) - before,
            1,
            "{path:?}: the reply and the FIN came apart"
        );
        drop(client);
        finish(relay, path).await;
    }
}

#[tokio::test]
async fn the_deadline_is_looked_at_while_bytes_never_stop() {
    // A flow whose source always has bytes and whose sink always takes
    // them uses up the runtime's budget on every poll of the relay (each
    // burst takes a unit of it): the watch, polled after it, must still see
    // the deadline pass.
    const LIFETIME: Duration = Duration::from_millis(300);
    let busy = async {
        loop {
            tokio::task::consume_budget().await;
        }
    };
    let deadlines = Deadlines {
        idle: None,
        end: Some((tokio::time::Instant::now() + LIFETIME, LIFETIME)),
    };
    let moved = Counter::default();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            biased;
            () = busy => unreachable!(),
            expired = expiry(&deadlines, || moved.get()) => expired,
        }
    })
    .await
    .expect("the lifetime never ended the relay");
    assert!(
        matches!(outcome, Outcome::LifetimeOver(LIFETIME)),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn urgent_data_neither_stops_nor_cuts_a_direction() {
    // Bulk first (the direction splices from then on), then one byte sent
    // urgent (MSG_OOB), more bytes, and the end. A receiver that does not
    // read urgent data gets every other byte: the upstream must too, and
    // see the end only after them. Once with the rest and the end right
    // behind the urgent byte, once with a pause before the rest (the relay
    // meets the mark alone), where the rest must arrive before the end is
    // sent: an interactive client waits for an answer to it.
    for pause in [false, true] {
        for path in PATHS {
            let what = format!("{path:?}, pause {pause}");
            let Lab {
                client,
                mut server,
                shutdown: _,
                relay,
            } = Lab::start(path).await;
            let before = random_bytes(256 * 1024, 21);
            let after = random_bytes(1000, 22);
            let mut expected = before.clone();
            expected.extend_from_slice(&after);
            let (mut read, mut write) = client.into_split();
            write.write_all(&before).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            SockRef::from(write.as_ref())
                .send_with_flags(b"!", libc::MSG_OOB)
                .unwrap();
            if pause {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            write.write_all(&after).await.unwrap();
            let mut got = vec![0u8; expected.len()];
            let mut tail = Vec::new();
            if pause {
                tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut got))
                    .await
                    .unwrap_or_else(|_| panic!("{what}: the rest stayed behind the mark"))
                    .unwrap();
                write.shutdown().await.unwrap();
                server.read_to_end(&mut tail).await.unwrap();
            } else {
                write.shutdown().await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), async {
                    server.read_exact(&mut got).await?;
                    server.read_to_end(&mut tail).await
                })
                .await
                .unwrap_or_else(|_| panic!("{what}: the upstream never saw the end"))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            assert!(got == expected, "{what}: the bytes differ");
            assert!(tail.is_empty(), "{what}: {} bytes more", tail.len());
            drop(server);
            let mut rest = Vec::new();
            read.read_to_end(&mut rest).await.unwrap();
            let relayed = finish(relay, path).await;
            assert!(
                matches!(relayed.outcome, Outcome::Closed),
                "{what}: {relayed:?}"
            );
        }
    }
}
