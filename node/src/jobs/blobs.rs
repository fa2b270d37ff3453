//! Blob transfers over `/hashgrid/blob/1`: serving a chunk of a blob, and fetching a whole
//! blob in verified chunks (inputs by providers, outputs by buyers).

use hashgrid_protocol::exchange::{BlobReply, BlobRequest};
use hashgrid_protocol::limits::MAX_CHUNK_BYTES;
use hashgrid_protocol::{Bytes, ContentId};
use libp2p::PeerId;

use crate::node::command::Net;

/// The reply to `req` from a blob's bytes.
pub(crate) fn chunk_of(bytes: &[u8], req: &BlobRequest) -> BlobReply {
    let total = bytes.len() as u64;
    let start = req.offset.min(total) as usize;
    let len = (req.len as usize).min(MAX_CHUNK_BYTES);
    let end = start.saturating_add(len).min(bytes.len());
    BlobReply::Chunk {
        total,
        bytes: Bytes(bytes[start..end].to_vec()),
    }
}

/// Fetches a blob of `size` bytes from `peer` in chunks ([`super::BLOB_WINDOW`] in flight),
/// hashing it as it arrives; fails unless it is exactly `size` bytes hashing to `id`.
pub(crate) async fn fetch_blob(
    net: &Net,
    peer: PeerId,
    id: ContentId,
    size: u64,
) -> Result<Vec<u8>, String> {
    use futures::StreamExt;
    let chunk = MAX_CHUNK_BYTES as u64;
    let offsets: Vec<u64> = (0..size.div_ceil(chunk)).map(|i| i * chunk).collect();
    let mut hasher = blake3::Hasher::new();
    let mut out = Vec::with_capacity(usize::try_from(size).map_err(|e| e.to_string())?);
    let mut replies = futures::stream::iter(offsets.into_iter().map(|offset| {
        let req = BlobRequest {
            id,
            offset,
            len: chunk.min(size - offset) as u32,
        };
        net.blob(peer, req)
    }))
    .buffered(super::BLOB_WINDOW);
    while let Some(reply) = replies.next().await {
        match reply? {
            BlobReply::Chunk { total, bytes } => {
                if total != size {
                    return Err(format!(
                        "blob {id} is {total} bytes at the peer, expected {size}"
                    ));
                }
                let want = chunk.min(size - out.len() as u64);
                if bytes.0.len() as u64 != want {
                    return Err(format!("blob {id}: short chunk at offset {}", out.len()));
                }
                hasher.update(&bytes.0);
                out.extend_from_slice(&bytes.0);
            }
            BlobReply::NotFound => return Err(format!("the peer does not serve blob {id}")),
        }
    }
    let got = ContentId(*hasher.finalize().as_bytes());
    if got != id {
        return Err(format!("blob hashes to {got}, not {id}"));
    }
    Ok(out)
}
