//! Many rtnetlink requests per `sendmsg`, on a thread of their own.
//!
//! One request and one answer per system call (what the `rtnetlink` crate
//! does) made a policy of 100 000 prefixes spend most of its start-up
//! sending routes one at a time, a quarter of that in user space
//! building and matching answers. Here the requests go out in sends of
//! [`PER_SEND`], none but the last of each asking to be acknowledged: the
//! kernel handles a send's requests in order within the system call, answers
//! only the ones it refuses, and acknowledges the last, which ends the send.
//! The socket is opened by the caller, so the requests reach the caller's
//! network namespace whatever thread sends them.

use std::io;

use rtnetlink::{
    packet_core::{
        ErrorMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader,
        NetlinkMessage, NetlinkPayload,
    },
    packet_route::RouteNetlinkMessage,
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};
use tokio::task::JoinHandle;

/// Requests per send. The kernel queues an answer for each refused one
/// (under 1 KiB each, with `NETLINK_CAP_ACK`), and all of a send's answers
/// must fit the socket's receive buffer (208 KiB by default) until read.
const PER_SEND: usize = 128;

/// The requests the kernel refused, by index, with its answer.
pub type Refusals = Vec<(usize, ErrorMessage)>;

/// Sends `requests` on a netlink socket opened here, from a blocking
/// thread; the handle gives the refusals, or the error that left the
/// outcome of some requests unknown.
pub fn in_background(
    requests: Vec<RouteNetlinkMessage>,
) -> io::Result<JoinHandle<io::Result<Refusals>>> {
    let socket = route_socket()?;
    // Answers carry the refused request's header, not all of it.
    socket.set_cap_ack(true)?;
    Ok(tokio::task::spawn_blocking(move || {
        send_all(&socket, &requests)
    }))
}

/// A route netlink socket talking to the kernel, in the calling thread's
/// network namespace.
pub(crate) fn route_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// Waits for [`in_background`]'s thread.
pub async fn finished(job: JoinHandle<io::Result<Refusals>>) -> io::Result<Refusals> {
    job.await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

fn send_all(socket: &Socket, requests: &[RouteNetlinkMessage]) -> io::Result<Refusals> {
    let mut refused = Vec::new();
    let mut sending = Vec::new();
    let mut answers = Vec::with_capacity(64 * 1024);
    for (chunk, requests) in requests.chunks(PER_SEND).enumerate() {
        let first = chunk * PER_SEND;
        let last = first + requests.len() - 1;
        sending.clear();
        for (index, request) in (first..).zip(requests) {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | creating(request);
            if index == last {
                header.flags |= NLM_F_ACK;
            }
            header.sequence_number = sequence(index);
            let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request.clone()));
            message.finalize();
            let start = sending.len();
            sending.resize(start + message.buffer_len(), 0);
            message.serialize(&mut sending[start..]);
        }
        socket.send(&sending, 0)?;
        // Every answer is queued before the send returns: waiting would
        // only hang on a kernel that broke that.
        'answers: loop {
            answers.clear();
            socket.recv(&mut answers, libc::MSG_DONTWAIT)?;
            let mut offset = 0;
            while offset < answers.len() {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answers[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                offset += aligned(answer.header.length);
                let index = answer.header.sequence_number as usize;
                if let NetlinkPayload::Error(error) = answer.payload {
                    let done = index == last;
                    if error.code.is_some() {
                        refused.push((index, error));
                    }
                    if done {
                        break 'answers;
                    }
                }
            }
        }
    }
    Ok(refused)
}

/// An add fails on an existing route (`ip route add`), never replaces it.
fn creating(request: &RouteNetlinkMessage) -> u16 {
    match request {
        RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::NewRule(_) => {
            NLM_F_CREATE | NLM_F_EXCL
        }
        _ => 0,
    }
}

fn sequence(index: usize) -> u32 {
    u32::try_from(index).expect("fewer requests than 2^32")
}

/// Netlink messages start on 4-byte boundaries.
fn aligned(length: u32) -> usize {
    (length as usize).next_multiple_of(4)
}
