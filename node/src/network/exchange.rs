//! The postcard codec of the direct protocols `/hashgrid/negotiate/1`, `/hashgrid/job/1` and
//! `/hashgrid/blob/1` (messages in [`hashgrid_protocol::exchange`]): each request and
//! response is read up to its protocol's size limit, then decoded.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A postcard codec with a size limit per direction.
pub struct ExchangeCodec<Req, Resp, const MAX_REQ: usize, const MAX_RESP: usize> {
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp, const A: usize, const B: usize> Default for ExchangeCodec<Req, Resp, A, B> {
    fn default() -> Self {
        ExchangeCodec {
            _types: PhantomData,
        }
    }
}

impl<Req, Resp, const A: usize, const B: usize> Clone for ExchangeCodec<Req, Resp, A, B> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

async fn read_limited<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(
    io: &mut R,
    max: usize,
) -> io::Result<T> {
    let mut buf = Vec::new();
    io.take(max as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message over the limit of {max} bytes"),
        ));
    }
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
        read_limited(io, MAX_REQ).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_limited(io, MAX_RESP).await
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
