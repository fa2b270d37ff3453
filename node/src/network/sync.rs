//! The `/hashgrid/sync/1` wire format: a postcard-encoded [`SyncRequest`] answered by a
//! postcard-encoded [`SyncResponse`], each read up to its size limit and then decoded. The
//! messages inside are signed gossip messages that the receiver re-verifies one by one.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use hashgrid_protocol::GossipMessage;

use super::{MAX_SYNC_REQUEST_BYTES, MAX_SYNC_RESPONSE_BYTES};

/// A request for the peer's current book.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Most messages wanted (the responder caps it at [`super::MAX_SYNC_MESSAGES`]).
    pub max: u32,
}

/// The signed messages a peer holds; each is re-verified on receipt like gossip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Capacity ads, asks and bids, as their authors signed them.
    pub messages: Vec<GossipMessage>,
}

/// The postcard codec of `/hashgrid/sync/1`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncCodec;

async fn read_limited<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(
    io: &mut R,
    max: u64,
) -> io::Result<T> {
    let mut buf = Vec::new();
    io.take(max.saturating_add(1)).read_to_end(&mut buf).await?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync message over the limit of {max} bytes"),
        ));
    }
    postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_all<T: Serialize, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    value: &T,
) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(io::Error::other)?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, MAX_SYNC_REQUEST_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, MAX_SYNC_RESPONSE_BYTES).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &res).await
    }
}
