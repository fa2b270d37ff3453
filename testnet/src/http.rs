//! A minimal HTTP/1.1 client for driving `hashgrid serve`: one request per connection
//! (`Connection: close`), JSON bodies, and server-sent events read as they arrive (chunked
//! transfer encoding decoded incrementally), so time to first token is measured at the byte.

use std::time::Instant;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of a response read.
const MAX_RESPONSE: usize = 64 << 20;

/// A response: status and body (for SSE, the `data:` payloads with when each arrived).
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (not SSE).
    pub body: Vec<u8>,
    /// The events' `data:` payloads and their arrival times (SSE).
    pub events: Vec<(Instant, String)>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }
}

/// POSTs `body` as JSON to `http://addr/path`.
pub async fn post(addr: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
    let text = body.to_string();
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    s.write_all(req.as_bytes()).await?;
    read_response(&mut s).await
}

async fn read_response(s: &mut TcpStream) -> anyhow::Result<Response> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // Head.
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let sse = header("content-type").is_some_and(|v| v.starts_with("text/event-stream"));
    let mut raw: Vec<u8> = buf[head_end + 4..].to_vec();
    let mut body: Vec<u8> = Vec::new();
    let mut events: Vec<(Instant, String)> = Vec::new();
    let mut pending = String::new();
    let mut done = false;
    loop {
        // Decode what is complete so far.
        if chunked {
            while let Some(line_end) = find(&raw, b"\r\n") {
                let size_str = String::from_utf8_lossy(&raw[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("bad chunk size {size_str:?}"))?;
                if size == 0 {
                    done = true;
                    break;
                }
                if raw.len() < line_end + 2 + size + 2 {
                    break;
                }
                body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
                raw.drain(..line_end + 2 + size + 2);
            }
        } else {
            body.append(&mut raw);
        }
        if sse {
            let now = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&body));
            body.clear();
            while let Some(i) = pending.find("\n\n") {
                let ev: String = pending.drain(..i + 2).collect();
                for l in ev.lines() {
                    if let Some(d) = l.strip_prefix("data: ") {
                        events.push((now, d.to_string()));
                    }
                }
            }
        }
        if done || body.len() > MAX_RESPONSE {
            break;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    Ok(Response {
        status,
        headers,
        body,
        events,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
