//! A minimal blocking HTTP/1 client for health and metrics endpoints and the Bot API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

/// `GET base+path` over a fresh connection; returns status and body. `base` is
/// `http://host:port` as in a ready line.
pub fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(base, "GET", path, None)
}

/// `POST base+path` with a body of the given content type; returns status and body.
pub fn http_post(base: &str, path: &str, content_type: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
    http_request(base, "POST", path, Some((content_type, body)))
}

fn http_request(base: &str, method: &str, path: &str, body: Option<(&str, &[u8])>) -> anyhow::Result<(u16, String)> {
    let authority = base.strip_prefix("http://").with_context(|| format!("{base} is not an http:// URL"))?;
    let authority = authority.trim_end_matches('/');
    let addr: SocketAddr =
        authority.to_socket_addrs()?.next().with_context(|| format!("{authority} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n")?;
    match body {
        Some((content_type, body)) => {
            write!(stream, "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n", body.len())?;
            stream.write_all(body)?;
        }
        None => write!(stream, "\r\n")?,
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("read the answer to {method} {path}"))?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("answer has no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").context("chunk size line not terminated")?;
        let size_line = String::from_utf8_lossy(&body[..line_end]).into_owned();
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).with_context(|| format!("bad chunk size {size_line:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).context("chunk shorter than its size")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).context("chunk not followed by CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").ok(), Some(b"abcde".to_vec()));
        assert!(dechunk(b"5\r\nab").is_err());
    }
}
