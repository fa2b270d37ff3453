//! Helpers shared by the tests and benchmarks that drive a real `hashgrid-node run` daemon
//! (`mod support;` in a test, `#[path = "../tests/support/mod.rs"] mod support;` in a bench).

#![allow(dead_code, clippy::unwrap_used)] // each user takes what it needs; a failed unwrap fails it

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on every wait for the daemon.
pub(crate) const LIMIT: Duration = Duration::from_secs(60);

/// The daemon, killed if the test fails before it exits.
pub(crate) struct Daemon(pub(crate) Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The daemon's log lines: those read so far, and the rest as they come.
pub(crate) struct Log {
    rx: mpsc::Receiver<String>,
    seen: std::cell::RefCell<Vec<String>>,
}

/// Spawns `hashgrid-node` with `args`; its stderr lines are echoed and kept.
pub(crate) fn spawn(args: &[&str]) -> (Daemon, Log) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hashgrid-node"))
        .args(args)
        .env("RUST_LOG", "info,libp2p=warn")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("daemon: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let log = Log {
        rx,
        seen: Default::default(),
    };
    (Daemon(child), log)
}

impl Log {
    /// Every line logged so far (reading what has arrived, without waiting).
    pub(crate) fn lines(&self) -> Vec<String> {
        let mut seen = self.seen.borrow_mut();
        seen.extend(self.rx.try_iter());
        seen.clone()
    }
}

/// The first log line, logged so far or within [`LIMIT`], that `pred` accepts.
pub(crate) fn wait_line(log: &Log, pred: impl Fn(&str) -> bool) -> String {
    if let Some(l) = log.seen.borrow().iter().find(|l| pred(l)) {
        return l.clone();
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .rx
            .recv_timeout(left)
            .expect("the daemon did not log what was expected in time");
        log.seen.borrow_mut().push(line.clone());
        if pred(&line) {
            return line;
        }
    }
}

/// The `host:port` of the first `http://host:port/` in a log line.
pub(crate) fn http_addr(line: &str) -> String {
    let rest = &line[line.find("http://").unwrap() + 7..];
    rest.split('/').next().unwrap().to_string()
}

/// A GET over plain HTTP/1.1: status, content type, body.
pub(crate) fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let body = if header("transfer-encoding") == "chunked" {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, header("content-type"), body)
}

/// Runs `bin --data-dir DATA ARGS…` to completion.
pub(crate) fn run(bin: &str, data: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--data-dir", data.to_str().unwrap()];
    all.extend_from_slice(args);
    Command::new(bin).args(&all).output().unwrap()
}

/// Runs the `hashgrid` CLI on the data dir `data`.
pub(crate) fn hashgrid(data: &Path, args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_hashgrid"), data, args)
}

/// A command's stdout as JSON, after it exited successfully.
pub(crate) fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The output script of a regtest address.
pub(crate) fn regtest_script(addr: &str) -> hashgrid_node::wallet::bitcoin::ScriptBuf {
    use std::str::FromStr;
    hashgrid_node::wallet::bitcoin::Address::from_str(addr)
        .unwrap()
        .require_network(hashgrid_node::wallet::bitcoin::Network::Regtest)
        .unwrap()
        .script_pubkey()
}
