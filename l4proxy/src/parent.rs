//! Asking a parent proxy to connect on: `CONNECT target HTTP/1.1` on a
//! connection to it (plain, or TLS), then its answer, which must be 2xx
//! before a byte of the client's goes out. The answer head is taken off the
//! stream exactly: whatever follows it is the server's, and stays for the
//! relay.

use std::{fmt, io, time::Duration};

use crate::{
    hello::{self, GaveUp, Look},
    stream::Stream,
};
use base64::Engine as _;

/// The longest answer head taken from a parent.
const MAX_ANSWER_LEN: usize = 16 * 1024;

/// `Proxy-Authorization` for `user` and `password` (RFC 7617).
pub fn basic_authorization(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

/// Why a parent did not open the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("parent proxy answered {status} to CONNECT {target}")]
    Refused { status: u16, target: String },
    #[error("parent proxy sent a malformed answer to CONNECT {target}")]
    Malformed { target: String },
    #[error("parent proxy closed before answering CONNECT {target}")]
    Closed { target: String },
    #[error("no answer from the parent proxy to CONNECT {target} within the connect timeout")]
    Timeout { target: String },
    #[error("asking the parent proxy: {0}")]
    Io(#[from] io::Error),
}

impl From<ParentError> for io::Error {
    fn from(e: ParentError) -> io::Error {
        match e {
            ParentError::Io(e) => e,
            timeout @ ParentError::Timeout { .. } => {
                io::Error::new(io::ErrorKind::TimedOut, timeout)
            }
            other => io::Error::other(other),
        }
    }
}

/// Asks the parent at the other end of `stream` for a tunnel to `target`
/// (`host:port`, a literal IPv6 host in brackets), and waits `deadline` for
/// its answer.
pub async fn open(
    stream: &mut Stream,
    target: &str,
    authorization: Option<&str>,
    deadline: Duration,
) -> Result<(), ParentError> {
    stream
        .send(request(target, authorization).as_bytes())
        .await?;
    let mut seen = 0;
    let verdict = stream
        .peek_until(MAX_ANSWER_LEN, deadline, |bytes| {
            seen = bytes.len();
            Look::or_next_byte(parse_answer(bytes).transpose(), bytes)
        })
        .await?;
    let target = target.to_owned();
    let answer = match verdict {
        Ok(Ok(answer)) => answer,
        // An answer beyond its size, or sent in more pieces than the
        // sniffer's most looks, is taken for a broken parent's.
        Ok(Err(Malformed)) | Err(GaveUp::TooLarge | GaveUp::TooManyPieces) => {
            return Err(ParentError::Malformed { target });
        }
        Err(GaveUp::Closed) => return Err(ParentError::Closed { target }),
        Err(GaveUp::Timeout) => return Err(ParentError::Timeout { target }),
    };
    if !(200..300).contains(&answer.status) {
        return Err(ParentError::Refused {
            status: answer.status,
            target,
        });
    }
    let drained = hello::nothing_follows(answer.head_len, seen, MAX_ANSWER_LEN);
    stream.consume(answer.head_len, drained).await?;
    Ok(())
}

fn request(target: &str, authorization: Option<&str>) -> String {
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(authorization) = authorization {
        head.push_str(&format!("Proxy-Authorization: {authorization}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// A parent's answer head: its status, and the bytes it takes.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    head_len: usize,
}

/// Not an HTTP/1.x answer.
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed answer")
    }
}

/// The final answer, after any interim (1xx) ones, which it takes with it
/// (RFC 9110 §15.2: a client must be able to read them); `Ok(None)`:
/// incomplete. 101 is final: a switch of protocols is no tunnel.
fn parse_answer(bytes: &[u8]) -> Result<Option<Answer>, Malformed> {
    let mut start = 0;
    loop {
        let Some(head) = parse_head(&bytes[start..])? else {
            return Ok(None);
        };
        if (100..200).contains(&head.status) && head.status != 101 {
            start += head.head_len;
            continue;
        }
        return Ok(Some(Answer {
            status: head.status,
            head_len: start + head.head_len,
        }));
    }
}

/// One answer head; `Ok(None)`: incomplete. The status line must be
/// `HTTP/1.x NNN ...`; the header lines that follow are skipped up to the
/// empty line (a bare LF ends lines too, as RFC 9112 §2.2 lets a recipient
/// accept).
fn parse_head(bytes: &[u8]) -> Result<Option<Answer>, Malformed> {
    const START: &[u8] = b"HTTP/1.";
    let checked = bytes.len().min(START.len());
    if bytes[..checked] != START[..checked] {
        return Err(Malformed);
    }
    let Some(line_end) = bytes.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line = bytes[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&bytes[..line_end]);
    let status = match line.get(START.len()..) {
        Some([b'0' | b'1', b' ', a, b, c, rest @ ..])
            if [a, b, c].iter().all(|d| d.is_ascii_digit())
                && (rest.is_empty() || rest[0] == b' ') =>
        {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(Malformed),
    };
    let mut at = line_end + 1;
    loop {
        let Some(len) = bytes[at..].iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line = &bytes[at..at + len];
        at += len + 1;
        if line.is_empty() || line == b"\r" {
            return Ok(Some(Answer {
                status,
                head_len: at,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Squid's answer to a CONNECT it allows (as squid 5 sends it).
    const SQUID_200: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
    const DENIED: &[u8] = b"HTTP/1.1 403 Forbidden\r\nServer: squid\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn answers_and_every_prefix_of_them() {
        for (answer, status) in [(SQUID_200, 200), (DENIED, 403)] {
            let mut with_data = answer.to_vec();
            with_data.extend_from_slice(b"\x16\x03\x01server bytes");
            assert_eq!(
                parse_answer(&with_data),
                Ok(Some(Answer {
                    status,
                    head_len: answer.len()
                }))
            );
            for end in 0..answer.len() {
                assert_eq!(parse_answer(&answer[..end]), Ok(None), "{end}");
            }
        }
        assert_eq!(
            parse_answer(b"HTTP/1.0 200 OK\n\nx"),
            Ok(Some(Answer {
                status: 200,
                head_len: 17
            }))
        );
    }

    /// Interim answers come before the final one and go with it; until
    /// the final one is whole, the answer is incomplete.
    #[test]
    fn interim_answers_are_read_past() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n\
                       HTTP/1.1 200 Connection established\r\n\r\n";
        let mut with_data = answer.to_vec();
        with_data.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            parse_answer(&with_data),
            Ok(Some(Answer {
                status: 200,
                head_len: answer.len()
            }))
        );
        for end in 0..answer.len() {
            assert_eq!(parse_answer(&answer[..end]), Ok(None), "{end}");
        }
        // 101 is final: not a tunnel.
        let switching = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert_eq!(
            parse_answer(switching),
            Ok(Some(Answer {
                status: 101,
                head_len: switching.len()
            }))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 100 Continue\r\n\r\nSSH-2.0-"),
            Err(Malformed)
        );
    }

    #[test]
    fn what_is_not_an_answer_is_refused_at_once() {
        for bad in [
            &b"SSH-2.0-"[..],
            b"\x16\x03\x01",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
        ] {
            assert_eq!(parse_answer(bad), Err(Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_request_names_its_target_and_credentials() {
        assert_eq!(
            request("app.example.test:443", None),
            "CONNECT app.example.test:443 HTTP/1.1\r\nHost: app.example.test:443\r\n\r\n"
        );
        // RFC 7617 §2's example.
        let authorization = basic_authorization("Aladdin", "open sesame");
        assert_eq!(authorization, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(
            request("[2001:db8::1]:443", Some(&authorization)),
            "CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\
             Proxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n"
        );
    }
}
