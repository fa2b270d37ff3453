//! The HTTP/1.1 that the test chain's servers speak (Esplora's API in `esplora_server`,
//! Bitcoin Core's JSON-RPC in `rpc_server`): one thread per connection, requests read up to a
//! body limit, responses with a length; for tests and demos on localhost, not the internet.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A request.
pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    /// The `Authorization` header, as sent.
    pub(super) authorization: Option<String>,
    pub(super) body: Vec<u8>,
}

/// A response.
pub(super) struct Response {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) body: Vec<u8>,
}

/// A handler of requests.
pub(super) type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A listening server; stops accepting when dropped.
#[derive(Debug)]
pub(super) struct Listener {
    pub(super) addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Listener {
    /// Serves `handler` on `127.0.0.1` at a free port. With `keep_alive`, a connection carries
    /// requests until the client closes it (JSON-RPC clients reuse theirs); without, one.
    pub(super) fn start(
        name: &str,
        max_body: usize,
        keep_alive: bool,
        handler: Handler,
    ) -> std::io::Result<Listener> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let conn_name = format!("{name}-conn");
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let handler = handler.clone();
                    let _ = std::thread::Builder::new()
                        .name(conn_name.clone())
                        .spawn(move || serve(conn, max_body, keep_alive, &*handler));
                }
            })?;
        Ok(Listener { addr, stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    conn: TcpStream,
    max_body: usize,
    keep_alive: bool,
    handler: &(dyn Fn(&Request) -> Response + Send + Sync),
) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_nodelay(true);
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = conn;
    loop {
        let response = match read_request(&mut reader, max_body) {
            None => return,
            Some(Ok(request)) => handler(&request),
            Some(Err(refused)) => {
                let _ = write_response(&mut out, &refused, false);
                return;
            }
        };
        if write_response(&mut out, &response, keep_alive).is_err() || !keep_alive {
            return;
        }
    }
}

/// The next request on a connection: `None` when it closed (or sent garbage), an error
/// response for a body over `max_body`.
fn read_request(
    reader: &mut BufReader<TcpStream>,
    max_body: usize,
) -> Option<Result<Request, Response>> {
    let mut request_line = String::new();
    match reader.read_line(&mut request_line) {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let (mut content_length, mut authorization) = (0usize, None);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().ok()?;
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    if content_length > max_body {
        return Some(Err(text(413, "body too large")));
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).ok()?;
    Some(Ok(Request {
        method,
        path,
        authorization,
        body,
    }))
}

fn write_response(out: &mut TcpStream, r: &Response, keep_alive: bool) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        r.status,
        match r.status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Error",
        },
        r.content_type,
        r.body.len(),
        if keep_alive { "keep-alive" } else { "close" },
    );
    // One write: a head and a body sent apart wait out the client's delayed ACK (Nagle),
    // 40 ms per request on a kept-alive connection.
    let mut all = head.into_bytes();
    all.extend_from_slice(&r.body);
    out.write_all(&all)?;
    out.flush()
}

/// A plain-text response.
pub(super) fn text(status: u16, s: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain",
        body: s.into().into_bytes(),
    }
}

/// A JSON response.
pub(super) fn json(status: u16, v: &serde_json::Value) -> Response {
    Response {
        status,
        content_type: "application/json",
        body: v.to_string().into_bytes(),
    }
}
