//! The postcard codec of the direct protocols `/hashgrid/negotiate/1`, `/hashgrid/job/1` and
//! `/hashgrid/blob/1` (messages in [`hashgrid_protocol::exchange`]): each request and
//! response is read up to its protocol's size limit, then decoded, and the bytes of requests
//! being read are bounded per connection and per node ([`InboundBudget`]).

use std::io;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Most bytes of inbound requests being read at once, over all connections and protocols:
/// what a crowd of peers that start requests and never finish them can make a node hold.
pub const MAX_INBOUND_BYTES: usize = 64 * 1024 * 1024;

/// Most bytes of inbound requests being read at once on one connection, per protocol: four
/// maximal messages. A peer has at most
/// [`MAX_CONNECTIONS_PER_PEER`](super::MAX_CONNECTIONS_PER_PEER) connections.
pub const MAX_INBOUND_BYTES_PER_CONNECTION: usize = 4 * 1024 * 1024;

/// The bytes of inbound requests this node is reading (received, not yet decoded), shared by
/// the codecs of every direct protocol. A request that would take a connection over
/// [`MAX_INBOUND_BYTES_PER_CONNECTION`] or the node over [`MAX_INBOUND_BYTES`] is refused at
/// once (its stream is reset) instead of being buffered until its timeout.
#[derive(Debug)]
pub struct InboundBudget {
    in_flight: AtomicUsize,
    max_total: usize,
    max_per_connection: usize,
    peak: AtomicUsize,
    refused: AtomicU64,
}

impl InboundBudget {
    /// A budget of `max_total` bytes, `max_per_connection` on each connection and protocol.
    pub fn new(max_total: usize, max_per_connection: usize) -> InboundBudget {
        InboundBudget {
            in_flight: AtomicUsize::new(0),
            max_total,
            max_per_connection,
            peak: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Bytes being read now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The most bytes ever being read at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Requests refused for want of budget.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Default for InboundBudget {
    fn default() -> Self {
        InboundBudget::new(MAX_INBOUND_BYTES, MAX_INBOUND_BYTES_PER_CONNECTION)
    }
}

/// Bytes one request holds of its connection's and the node's budgets; given back on drop
/// (the request decoded, failed, or was dropped with its stream).
struct Held<'a> {
    budget: &'a InboundBudget,
    connection: &'a AtomicUsize,
    bytes: usize,
}

impl Held<'_> {
    fn take(&mut self, n: usize) -> io::Result<()> {
        let conn = self.connection.fetch_add(n, Ordering::AcqRel) + n;
        let total = self.budget.in_flight.fetch_add(n, Ordering::AcqRel) + n;
        self.bytes += n;
        if conn > self.budget.max_per_connection || total > self.budget.max_total {
            self.budget.refused.fetch_add(1, Ordering::Relaxed);
            let which = if conn > self.budget.max_per_connection {
                "this connection's"
            } else {
                "the node's"
            };
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("refused: {which} budget for requests being read is spent"),
            ));
        }
        self.budget.peak.fetch_max(total, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.connection.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget
            .in_flight
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A postcard codec with a size limit per direction, whose request reads draw on an
/// [`InboundBudget`].
///
/// The behaviour clones its codec once for each connection's handler, and the handler clones
/// that for each stream: a clone of the behaviour's codec starts a new per-connection count,
/// clones of that share it.
pub struct ExchangeCodec<Req, Resp, const MAX_REQ: usize, const MAX_RESP: usize> {
    budget: Arc<InboundBudget>,
    /// `None` in the behaviour's own codec; the connection's count in its clones.
    connection: Option<Arc<AtomicUsize>>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp, const A: usize, const B: usize> ExchangeCodec<Req, Resp, A, B> {
    /// A codec drawing on `budget`.
    pub fn new(budget: Arc<InboundBudget>) -> Self {
        ExchangeCodec {
            budget,
            connection: None,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp, const A: usize, const B: usize> Default for ExchangeCodec<Req, Resp, A, B> {
    fn default() -> Self {
        Self::new(Arc::new(InboundBudget::default()))
    }
}

impl<Req, Resp, const A: usize, const B: usize> Clone for ExchangeCodec<Req, Resp, A, B> {
    fn clone(&self) -> Self {
        ExchangeCodec {
            budget: self.budget.clone(),
            connection: Some(self.connection.clone().unwrap_or_default()),
            _types: PhantomData,
        }
    }
}

/// Reads one message of at most `max` bytes, up to the end of the stream, then decodes it.
/// With `held`, every byte is first taken from the budget.
async fn read_limited<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(
    io: &mut R,
    max: usize,
    mut held: Option<Held<'_>>,
) -> io::Result<T> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        if buf.len() + n > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message over the limit of {max} bytes"),
            ));
        }
        if let Some(h) = held.as_mut() {
            h.take(n)?;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    drop(chunk);
    postcard::from_bytes(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_all<T: Serialize, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    value: &T,
    max: usize,
) -> io::Result<()> {
    let bytes = postcard::to_stdvec(value).map_err(io::Error::other)?;
    if bytes.len() > max {
        // The peer would refuse it anyway; fail here with a clear error.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message of {} bytes is over the limit of {max}",
                bytes.len()
            ),
        ));
    }
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp, const MAX_REQ: usize, const MAX_RESP: usize> libp2p::request_response::Codec
    for ExchangeCodec<Req, Resp, MAX_REQ, MAX_RESP>
where
    Req: Serialize + DeserializeOwned + Send + Sync + 'static,
    Resp: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let unshared = AtomicUsize::new(0);
        let held = Held {
            budget: &self.budget,
            connection: self.connection.as_deref().unwrap_or(&unshared),
            bytes: 0,
        };
        read_limited(io, MAX_REQ, Some(held)).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        // A response answers a request this node chose to make: bounded by its own
        // requests in flight, not drawn from the inbound budget.
        read_limited(io, MAX_RESP, None).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &req, MAX_REQ).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_all(io, &res, MAX_RESP).await
    }
}
