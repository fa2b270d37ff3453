//! The buyer CLI's configuration: `<data-dir>/config.toml`, written by `hashgrid init`.
//! Every key is optional; command-line flags override it (`--network`, `--bootstrap` adds to
//! the list).
//!
//! ```toml
//! network = "main"
//! bootstrap = ["/dns4/seed.example.net/tcp/4001/p2p/12D3KooW..."]
//! mdns = true
//! listen = []
//! ```

use std::path::{Path, PathBuf};

use hashgrid_protocol::Network;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, MAX_CONFIG_BYTES};
use crate::node::{Node, NodeBuilder};

/// The config file's name inside the data dir.
pub const CONFIG_FILE: &str = "config.toml";

/// The buyer's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// The network: `main`, `test`, or a private testnet's name.
    pub network: String,
    /// Peers to join through (multiaddrs, ideally ending in `/p2p/<PeerId>`).
    pub bootstrap: Vec<String>,
    /// Find peers on the local network with mDNS.
    pub mdns: bool,
    /// Addresses to listen on (a buyer needs none: it dials out).
    pub listen: Vec<String>,
    /// Verification by re-execution for every job that does not say otherwise (`none`,
    /// `spot:P`, `replicate:K`; see docs/VERIFICATION.md): `submit` when the job file has no
    /// `verify`, `generate`, and every request `serve` runs. `--verify` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// How this buyer settles (default: ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle: Option<crate::settle::SettleSection>,
    /// The OpenAI-compatible gateway (`hashgrid serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<ServeSection>,
}

/// `[serve]`: what `hashgrid serve` serves and to whom. Command-line flags override it.
///
/// ```toml
/// [serve]
/// listen = "127.0.0.1:8080"
/// models = ["/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf", "minilm=/srv/models/all-MiniLM-L6-v2"]
/// api_keys_file = "/etc/hashgrid/api-keys"   # one key per line
/// key_cap_msat_per_day = 5000000
/// cap_msat_per_day = 50000000
/// max_price = 2000                           # msat per GPU-second
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeSection {
    /// Address to listen on (default `127.0.0.1:8080`).
    pub listen: Option<String>,
    /// Models: `PATH` or `ID=PATH` (GGUF files; embedding model directories).
    pub models: Vec<String>,
    /// API keys (prefer `api_keys_file`: config files get copied around).
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments).
    pub api_keys_file: Option<PathBuf>,
    /// Most msat one key may spend per UTC day.
    pub key_cap_msat_per_day: Option<u64>,
    /// Most msat the gateway may spend per UTC day.
    pub cap_msat_per_day: Option<u64>,
    /// Highest price in msat per GPU-second (default: any).
    pub max_price: Option<u64>,
    /// Tokens generated when a request does not say.
    pub default_max_tokens: Option<u32>,
    /// Longest a job may run, in seconds.
    pub max_seconds: Option<u32>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            network: Network::main().as_str().to_string(),
            bootstrap: Vec::new(),
            mdns: true,
            listen: Vec::new(),
            verify: None,
            settle: None,
            serve: None,
        }
    }
}

impl ClientConfig {
    /// The config file in `data_dir`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(CONFIG_FILE)
    }

    /// Reads the config in `data_dir`, or the defaults if there is none.
    pub fn load_or_default(data_dir: &Path) -> Result<ClientConfig, ConfigError> {
        let path = Self::path(data_dir);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ClientConfig::default());
            }
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let cfg: ClientConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks that every value parses.
    pub fn check(&self) -> Result<(), ConfigError> {
        self.network()?;
        self.bootstrap_addrs()?;
        self.listen_addrs()?;
        self.verify_mode()?;
        Ok(())
    }

    /// The default verification mode (`none` when the file does not say).
    pub fn verify_mode(&self) -> Result<hashgrid_protocol::VerifyMode, ConfigError> {
        match &self.verify {
            None => Ok(hashgrid_protocol::VerifyMode::None),
            Some(v) => v
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("verify: {e}"))),
        }
    }

    /// The network.
    pub fn network(&self) -> Result<Network, ConfigError> {
        Network::new(&self.network)
            .map_err(|e| ConfigError::Invalid(format!("network {:?}: {e}", self.network)))
    }

    fn addrs(list: &[String], what: &str) -> Result<Vec<Multiaddr>, ConfigError> {
        list.iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| ConfigError::Invalid(format!("{what} address {a:?}: {e}")))
            })
            .collect()
    }

    /// The bootstrap peers.
    pub fn bootstrap_addrs(&self) -> Result<Vec<Multiaddr>, ConfigError> {
        Self::addrs(&self.bootstrap, "bootstrap")
    }

    /// The listen addresses.
    pub fn listen_addrs(&self) -> Result<Vec<Multiaddr>, ConfigError> {
        Self::addrs(&self.listen, "listen")
    }

    /// The file's TOML text.
    pub fn to_toml(&self) -> String {
        // Plain strings, bools and lists always serialize.
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# hashgrid buyer config (written by `hashgrid init`; every key is optional).\n\
             # Flags override it: --network, --bootstrap (adds to the list).\n{body}"
        )
    }

    /// A node builder for a buyer with this config and data dir.
    pub fn builder(&self, data_dir: &Path) -> Result<NodeBuilder, ConfigError> {
        let mut b = Node::builder()
            .network(self.network()?)
            .data_dir(data_dir)
            .mdns(self.mdns);
        for a in self.bootstrap_addrs()? {
            b = b.bootstrap(a);
        }
        for a in self.listen_addrs()? {
            b = b.listen(a);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ClientConfig::load_or_default(dir.path()).unwrap(),
            ClientConfig::default()
        );
        let cfg = ClientConfig {
            network: "demo".into(),
            bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            mdns: false,
            listen: Vec::new(),
            verify: Some("spot:0.1".into()),
            settle: None,
            serve: None,
        };
        std::fs::write(ClientConfig::path(dir.path()), cfg.to_toml()).unwrap();
        assert_eq!(ClientConfig::load_or_default(dir.path()).unwrap(), cfg);
        std::fs::write(ClientConfig::path(dir.path()), "bootstrap = [\"nope\"]\n").unwrap();
        let e = ClientConfig::load_or_default(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        std::fs::write(ClientConfig::path(dir.path()), "colour = 1\n").unwrap();
        assert!(ClientConfig::load_or_default(dir.path()).is_err());
        std::fs::write(ClientConfig::path(dir.path()), "verify = \"spot:2\"\n").unwrap();
        let e = ClientConfig::load_or_default(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify"), "{e}");
    }
}
