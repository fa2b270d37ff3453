//! The site processes: real `hashgrid-node run` daemons, each with its own data dir and
//! loopback port, killed (SIGKILL) and restarted on demand, stopped (SIGTERM) at the end, and
//! never left behind: every child is killed when its [`Site`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a site may take to stop after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds a workspace binary next to this executable (`target/<profile>/`).
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the testnet binary")?;
    let mut dirs = Vec::new();
    if let Some(d) = exe.parent() {
        dirs.push(d.to_path_buf());
        // Test binaries live in target/<profile>/deps.
        if let Some(p) = d.parent() {
            dirs.push(p.to_path_buf());
        }
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "cannot find the `{name}` binary next to {}; build it first: cargo build --release -p hashgrid-node",
        exe.display()
    )
}

/// A free TCP port on 127.0.0.1 for a site to listen on, below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`) and never handed out twice by this process.
///
/// A port from the ephemeral range would race: between this check and the site's bind, the
/// outbound connections of the sites already running (each from a fresh ephemeral port) can
/// take it, and the site fails to listen.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u32, ephemeral_start.clamp(10_001, 65_536));
    let span = hi - lo;
    // Start at a point that differs between runs (and between testnets run side by side).
    let seed = (std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()))
        % span;
    let _ = NEXT.compare_exchange(0, seed + 1, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(lo + (n % span)).context("port out of range")?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {lo} and {hi}")
}

/// How one site is run.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Index (0-based).
    pub index: usize,
    /// Its region.
    pub region: String,
    /// Price, msat per GPU-second.
    pub price: u64,
    /// Units offered.
    pub units: u32,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Its address: 127.0.0.1, or its own address in its region's network namespace.
    pub ip: String,
    /// Its region's network namespace, when regional latency is on.
    pub ns: Option<String>,
    /// Its port.
    pub port: u16,
    /// Its PeerId.
    pub peer_id: String,
    /// Port of its Prometheus metrics (`--metrics`), if served.
    pub metrics_port: Option<u16>,
    /// Its config file (`--config`), e.g. a `[settle]` section; flags override it.
    pub config: Option<PathBuf>,
    /// Extra environment, e.g. its emulated link delays (`HASHGRID_LINK_DELAYS`).
    pub env: Vec<(String, String)>,
}

impl SiteSpec {
    /// Its dialable address.
    pub fn addr(&self) -> String {
        format!("/ip4/{}/tcp/{}/p2p/{}", self.ip, self.port, self.peer_id)
    }
}

/// A running (or killed) site process.
pub struct Site {
    /// How it runs.
    pub spec: SiteSpec,
    child: Option<Child>,
    bootstrap: Vec<String>,
    network: String,
    binary: PathBuf,
    /// Times it was killed.
    pub kills: u32,
    /// Highest resident set size seen, in KiB (VmHWM over all its incarnations).
    pub peak_rss_kib: u64,
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates the site's identity and returns its PeerId.
pub fn create_identity(binary: &Path, data_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("id")
        .output()
        .context("running hashgrid-node id")?;
    if !out.status.success() {
        bail!(
            "hashgrid-node id failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Site {
    /// Starts a site.
    pub fn start(
        binary: &Path,
        spec: SiteSpec,
        network: &str,
        bootstrap: Vec<String>,
    ) -> anyhow::Result<Site> {
        let mut s = Site {
            spec,
            child: None,
            bootstrap,
            network: network.to_string(),
            binary: binary.to_path_buf(),
            kills: 0,
            peak_rss_kib: 0,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.spec.data_dir.join("node.log"))
            .context("creating the site's log")?;
        let mut cmd = match &self.spec.ns {
            Some(ns) => {
                // `ip netns exec` execs the binary: the child's pid is the node's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        cmd.arg("--data-dir").arg(&self.spec.data_dir).arg("run");
        if let Some(c) = &self.spec.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["--network", &self.network, "--listen"])
            .arg(format!("/ip4/{}/tcp/{}", self.spec.ip, self.spec.port))
            .args(["--region", &self.spec.region, "--price"])
            .arg(self.spec.price.to_string())
            .arg("--units")
            .arg(self.spec.units.to_string())
            .arg("--no-mdns");
        if let Some(p) = self.spec.metrics_port {
            cmd.arg("--metrics").arg(format!("{}:{p}", self.spec.ip));
        }
        for b in &self.bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .env("RUST_LOG", "info,libp2p=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting site {}", self.spec.index))?;
        self.child = Some(child);
        Ok(())
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Samples its peak RSS (Linux: VmHWM from /proc).
    pub fn sample_rss(&mut self) {
        let Some(pid) = self.pid() else { return };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmHWM:") {
                let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                self.peak_rss_kib = self.peak_rss_kib.max(kib);
            }
        }
    }

    /// SIGKILL (no chance to flush or say goodbye).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.sample_rss();
        if let Some(mut c) = self.child.take() {
            c.kill().context("SIGKILL")?;
            c.wait().context("reaping a killed site")?;
            self.kills += 1;
        }
        Ok(())
    }

    /// Starts it again on the same data dir and port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit (killed after [`STOP_TIMEOUT`]). Returns whether it
    /// exited cleanly.
    pub fn stop(&mut self) -> anyhow::Result<bool> {
        self.sample_rss();
        let Some(mut c) = self.child.take() else {
            return Ok(true);
        };
        let pid = c.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A Prometheus scrape config for the sites that serve metrics: one target per site, labelled
/// with its region and index (the fleet dashboard in `examples/ops/` groups by `region`).
pub fn prometheus_config(specs: &[SiteSpec], network: &str) -> String {
    let mut out = format!(
        "# Written by hashgrid-testnet for network {network}: scrape every site of the grid.\n\
         # prometheus --config.file=THIS_FILE, then import examples/ops/grafana-fleet.json.\n\
         global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: hashgrid-site\n    static_configs:\n"
    );
    for s in specs {
        if let Some(p) = s.metrics_port {
            out.push_str(&format!(
                "      - targets: [\"{}:{p}\"]\n        labels: {{ region: \"{}\", site: \"site-{:02}\" }}\n",
                s.ip, s.region, s.index
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_scrape_config_names_every_site_with_its_region() {
        let spec = |index: usize, region: &str, metrics_port| super::SiteSpec {
            index,
            region: region.into(),
            price: 100,
            units: 1,
            data_dir: "/tmp".into(),
            ip: "127.0.0.1".into(),
            ns: None,
            port: 4001,
            peer_id: String::new(),
            metrics_port,
            config: None,
            env: Vec::new(),
        };
        let text = super::prometheus_config(
            &[
                spec(0, "us-east", Some(9100)),
                spec(1, "eu-north", Some(9101)),
                spec(2, "eu-north", None),
            ],
            "testnet-1",
        );
        assert!(text.contains("job_name: hashgrid-site"), "{text}");
        assert!(text.contains(r#"- targets: ["127.0.0.1:9100"]"#), "{text}");
        assert!(
            text.contains(r#"labels: { region: "eu-north", site: "site-01" }"#),
            "{text}"
        );
        assert_eq!(text.matches("- targets:").count(), 2, "{text}");
    }

    #[test]
    fn site_ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ephemeral_start: u16 =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(32768);
        let ports: Vec<u16> = (0..50).map(|_| super::free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(
            ports.iter().all(|p| *p >= 10_000 && *p < ephemeral_start),
            "{ports:?}"
        );
        for p in ports {
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
