//! How a load generator reaches the server: straight to an address, or
//! through an explicit proxy's HTTP/1.1 CONNECT tunnel.

use std::{fmt, io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Where a client connects, and what it asks for there.
#[derive(Clone, Copy, Debug)]
pub enum Dial {
    /// To this address (the server's or a transparent proxy's service).
    Straight(SocketAddr),
    /// To the proxy at `proxy`, asking it for a tunnel to `server` (an IP
    /// literal, so that no proxy resolves a name).
    Tunnel {
        proxy: SocketAddr,
        server: SocketAddr,
    },
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Dial {
        Dial::Straight(addr)
    }
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dial::Straight(addr) => write!(f, "{addr}"),
            Dial::Tunnel { proxy, server } => write!(f, "{server} via CONNECT proxy {proxy}"),
        }
    }
}

/// Bound on the proxy's answer head; the proxies here send under 100 bytes.
const ANSWER_MAX: usize = 1024;

impl Dial {
    /// A connection whose next bytes reach the server: for a tunnel, once
    /// the proxy has answered `200`.
    pub async fn connect(self) -> io::Result<TcpStream> {
        let (addr, tunnel_to) = match self {
            Dial::Straight(addr) => (addr, None),
            Dial::Tunnel { proxy, server } => (proxy, Some(server)),
        };
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        if let Some(server) = tunnel_to {
            let head = format!("CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            read_established(&mut stream).await?;
        }
        Ok(stream)
    }
}

/// Reads the proxy's answer head and fails unless it is a 2xx. The servers
/// here never speak first, so nothing of the tunnel can follow the head.
async fn read_established(stream: &mut TcpStream) -> io::Result<()> {
    let mut answer = [0u8; ANSWER_MAX];
    let mut have = 0;
    let head_len = loop {
        match stream.read(&mut answer[have..]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => have += n,
        }
        if let Some(end) = answer[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if have == answer.len() {
            return Err(io::Error::other("CONNECT answer head too long"));
        }
    };
    if have > head_len {
        return Err(io::Error::other("bytes after the CONNECT answer head"));
    }
    established(&answer[..head_len]).map_err(io::Error::other)
}

/// Whether an answer head opens the tunnel (a 2xx status); if not, its
/// status line.
fn established(head: &[u8]) -> Result<(), String> {
    let head = String::from_utf8_lossy(head);
    let status_line = head.lines().next().unwrap_or_default();
    match status_line.split_whitespace().nth(1) {
        Some(status) if status.len() == 3 && status.starts_with('2') => Ok(()),
        _ => Err(format!("CONNECT answered {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_2xx_answer_opens_the_tunnel() {
        assert!(established(b"HTTP/1.1 200 Connection established\r\n\r\n").is_ok());
        assert!(established(b"HTTP/1.0 200 OK\r\nVia: x\r\n\r\n").is_ok());
        let refused = established(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            refused.unwrap_err(),
            "CONNECT answered \"HTTP/1.1 403 Forbidden\""
        );
        assert!(established(b"HTTP/1.1 2000 Odd\r\n\r\n").is_err());
        assert!(established(b"\r\n\r\n").is_err());
    }
}
