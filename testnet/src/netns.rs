//! Regional latency with Linux network namespaces: one namespace per region, joined to the
//! host by a veth pair, with netem delaying every packet that leaves or enters a region by half
//! the requested latency (so region → region is the full latency one way, and buyers on the
//! host see half). Every site gets its own address in its region (10.77.REGION.10+i), so
//! gossipsub's per-IP colocation scoring sees distinct hosts. Needs root and iproute2; the
//! namespaces are removed, and `ip_forward` restored, when [`Regions`] is dropped.

use std::process::Command;

/// Prefix of the namespace and interface names.
const PREFIX: &str = "hg";

fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn tc(args: &[&str]) -> Result<(), String> {
    run("tc", args)
}

/// Whether this process can create namespaces: root, with `ip` and `tc` on the PATH.
pub fn supported() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|_| "not Linux (no /proc/self/status)".to_string())?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        return Err(format!(
            "network namespaces need root (effective uid is {uid})"
        ));
    }
    for tool in ["ip", "tc"] {
        let ok = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    Ok(())
}

/// The regions' namespaces, removed on drop.
pub struct Regions {
    tag: String,
    count: usize,
    forward_before: Option<String>,
}

const FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Regions {
    /// Creates `count` namespaces with `latency_ms` between regions. `tag` keeps names unique
    /// per run (a few hex digits).
    pub fn setup(tag: &str, count: usize, latency_ms: u64) -> Result<Regions, String> {
        supported()?;
        let mut r = Regions {
            tag: tag.chars().take(4).collect(),
            count: 0,
            forward_before: std::fs::read_to_string(FORWARD).ok(),
        };
        std::fs::write(FORWARD, "1").map_err(|e| format!("enabling ip_forward: {e}"))?;
        let half = format!("{}ms", latency_ms.div_ceil(2));
        for k in 0..count {
            let ns = r.ns(k);
            let (host, inner) = r.veth(k);
            ip(&["netns", "add", &ns])?;
            r.count = k + 1;
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["addr", "add", &format!("10.77.{k}.1/24"), "dev", &host])?;
            ip(&["link", "set", &host, "up"])?;
            let exec = |args: &[&str]| {
                let mut all = vec!["netns", "exec", ns.as_str(), "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            exec(&["link", "set", "lo", "up"])?;
            exec(&["link", "set", &inner, "up"])?;
            exec(&["addr", "add", &format!("10.77.{k}.2/24"), "dev", &inner])?;
            exec(&["route", "add", "default", "via", &format!("10.77.{k}.1")])?;
            tc(&[
                "qdisc", "add", "dev", &host, "root", "netem", "delay", &half,
            ])?;
            ip(&[
                "netns", "exec", &ns, "tc", "qdisc", "add", "dev", &inner, "root", "netem",
                "delay", &half,
            ])?;
        }
        Ok(r)
    }

    /// The namespace of region `k`.
    pub fn ns(&self, k: usize) -> String {
        format!("{PREFIX}{}r{k}", self.tag)
    }

    fn veth(&self, k: usize) -> (String, String) {
        (
            format!("{PREFIX}{}h{k}", self.tag),
            format!("{PREFIX}{}n{k}", self.tag),
        )
    }

    /// Gives site `i` of region `k` its own address and returns it.
    pub fn add_site(&self, k: usize, i: usize) -> Result<String, String> {
        let addr = format!("10.77.{k}.{}", 10 + i % 240);
        let (_, inner) = self.veth(k);
        ip(&[
            "netns",
            "exec",
            &self.ns(k),
            "ip",
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ])?;
        Ok(addr)
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        for k in 0..self.count {
            // Deleting the namespace deletes its end of the veth pair, and so the pair.
            let _ = ip(&["netns", "del", &self.ns(k)]);
            let (host, _) = self.veth(k);
            let _ = ip(&["link", "del", &host]);
        }
        if let Some(v) = &self.forward_before {
            let _ = std::fs::write(FORWARD, v.trim());
        }
    }
}
