//! Node identity: one ed25519 key per node, also its libp2p `PeerId`.
//!
//! The same 32-byte secret signs gossip (as the libp2p identity) and receipts (as the
//! hashgrid identity), so "who gossiped this" and "who signed this receipt" are one answer.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::limits::MAX_KEY_FILE_BYTES;

/// An ed25519 public key: the identity of a node, buyer or provider.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// An ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

/// A node's signing key. Cloning copies the secret; `Debug` never prints it.
#[derive(Clone)]
pub struct Keypair {
    secret: SigningKey,
}

/// Loading or creating a key file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading, creating or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a 32-byte ed25519 secret.
    #[error("key file {path} is {len} bytes; an ed25519 secret key file is exactly 32 bytes")]
    BadLength {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// Other users can read the secret.
    #[error("key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// A public key that is not a valid ed25519 point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ed25519 public key: {0}")]
pub struct BadPublicKey(pub String);

impl Keypair {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Result<Keypair, KeyFileError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(Keypair::from_secret_bytes(bytes))
    }

    /// The key with this 32-byte secret (deterministic; for tests and key files).
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Keypair {
        Keypair {
            secret: SigningKey::from_bytes(&bytes),
        }
    }

    /// The 32-byte secret. Handle with care.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.secret.verifying_key().to_bytes())
    }

    /// Signs `msg` as is. Prefer [`crate::Signed::sign`], which adds the domain tag.
    pub fn sign_raw(&self, msg: &[u8]) -> Signature {
        Signature(self.secret.sign(msg).to_bytes())
    }

    /// The same key as a libp2p identity keypair.
    pub fn to_libp2p(&self) -> libp2p_identity::Keypair {
        // ed25519_from_bytes only fails on a wrong length, and ours is always 32 bytes.
        libp2p_identity::Keypair::ed25519_from_bytes(self.secret.to_bytes())
            .expect("a 32-byte ed25519 secret is always accepted")
    }

    /// The libp2p `PeerId` of this key.
    pub fn peer_id(&self) -> libp2p_identity::PeerId {
        self.public().to_peer_id()
    }

    /// Loads the key at `path`, or creates one there (mode 0600, parent dirs created) if the
    /// file does not exist. Refuses a key file that other users can read.
    pub fn load_or_generate(path: &Path) -> Result<Keypair, KeyFileError> {
        match Keypair::load(path) {
            Err(KeyFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let key = Keypair::generate()?;
                key.save_new(path)?;
                Ok(key)
            }
            other => other,
        }
    }

    /// Loads the 32-byte secret at `path`.
    pub fn load(path: &Path) -> Result<Keypair, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() != 32 {
            return Err(KeyFileError::BadLength {
                path: path.to_owned(),
                len: meta.len().min(MAX_KEY_FILE_BYTES + 1),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let secret: [u8; 32] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| KeyFileError::BadLength {
                    path: path.to_owned(),
                    len: bytes.len() as u64,
                })?;
        Ok(Keypair::from_secret_bytes(secret))
    }

    /// Writes the secret to a new file at `path` with mode 0600; fails if it exists.
    pub fn save_new(&self, path: &Path) -> Result<(), KeyFileError> {
        use std::io::Write;
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(path).map_err(io)?;
        file.write_all(&self.secret.to_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.public())
    }
}

impl PublicKey {
    /// Checks `sig` over `msg` (strict: rejects small-order keys and malleable signatures).
    pub fn verify_raw(&self, msg: &[u8], sig: &Signature) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        key.verify_strict(msg, &sig).is_ok() && key.verify(msg, &sig).is_ok()
    }

    /// The libp2p `PeerId` of this key.
    ///
    /// # Panics
    /// Never for keys from [`Keypair::public`]; use [`PublicKey::try_to_peer_id`] for keys
    /// that came from outside.
    pub fn to_peer_id(&self) -> libp2p_identity::PeerId {
        self.try_to_peer_id()
            .expect("public keys of real keypairs are valid ed25519 points")
    }

    /// The libp2p `PeerId` of this key, or an error if the bytes are not a valid key.
    pub fn try_to_peer_id(&self) -> Result<libp2p_identity::PeerId, BadPublicKey> {
        let pk = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|e| BadPublicKey(e.to_string()))?;
        Ok(libp2p_identity::PublicKey::from(pk).to_peer_id())
    }

    /// The key inside a libp2p public key, if it is an ed25519 key.
    pub fn from_libp2p(pk: &libp2p_identity::PublicKey) -> Option<PublicKey> {
        pk.clone()
            .try_into_ed25519()
            .ok()
            .map(|k| PublicKey(k.to_bytes()))
    }

    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl FromStr for PublicKey {
    type Err = BadPublicKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| BadPublicKey(format!("expected 64 hex digits, got {s:?}")))?;
        Ok(PublicKey(out))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

macro_rules! hex_serde {
    ($ty:ident, $n:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(self.0))
                } else {
                    serde::Serialize::serialize(&self.0[..], s)
                }
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let mut out = [0u8; $n];
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
                } else {
                    let bytes: &[u8] = serde::Deserialize::deserialize(d)?;
                    if bytes.len() != $n {
                        return Err(serde::de::Error::invalid_length(
                            bytes.len(),
                            &stringify!($n),
                        ));
                    }
                    out.copy_from_slice(bytes);
                }
                Ok($ty(out))
            }
        }
    };
}
hex_serde!(PublicKey, 32);
hex_serde!(Signature, 64);
