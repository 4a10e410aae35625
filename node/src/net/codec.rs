//! Framing for every Meshgram request-response protocol: a 4-byte big-endian length, then a
//! postcard-encoded message. Limits are checked before a byte of the body is read, so an
//! oversized or garbage request costs the server nothing but an error reply.
//!
//! Inbound requests decode to `Result<Req, FrameError>`: the handler answers a bad frame with
//! a clear protocol-level error instead of the stream just dying.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;
use serde::{Serialize, de::DeserializeOwned};

/// Why an inbound frame could not become a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum FrameError {
    /// The length prefix announced more than the protocol allows.
    #[error("request of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The body is not a valid message of this protocol.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A request larger than a greeting before the peer was welcomed.
    #[error("a request of {len} bytes before Hello (at most {max} until then); say Hello first")]
    NotWelcomed { len: usize, max: usize },
    /// More greetings than a connection may send so soon.
    #[error("too many greetings on this connection; retry after {retry_after_secs} s")]
    TooManyGreetings { retry_after_secs: u64 },
}

/// Length-prefixed postcard codec with a size limit in each direction.
#[derive(Debug)]
pub struct PostcardCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for PostcardCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request, self.max_response)
    }
}

impl<Req, Resp> PostcardCodec<Req, Resp> {
    /// A codec refusing requests over `max_request` and responses over `max_response` bytes.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        Self { max_request, max_response, _types: PhantomData }
    }
}

async fn read_len<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<usize> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    Ok(u32::from_be_bytes(len) as usize)
}

async fn read_body<T: AsyncRead + Unpin>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

/// Encodes before any `.await`, so that the message need not be `Sync`.
fn encode_frame<M: Serialize>(msg: &M, max: usize) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if body.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, FrameError::TooLarge { len: body.len(), max }));
    }
    let len = u32::try_from(body.len()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend(body);
    Ok(frame)
}

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, frame: Vec<u8>) -> io::Result<()> {
    io.write_all(&frame).await?;
    io.close().await
}

impl<Req, Resp> Codec for PostcardCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Result<Req, FrameError>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_len(io).await?;
        if len > self.max_request {
            return Ok(Err(FrameError::TooLarge { len, max: self.max_request }));
        }
        let body = read_body(io, len).await?;
        Ok(postcard::from_bytes(&body).map_err(|e| FrameError::Malformed(e.to_string())))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_len(io).await?;
        if len > self.max_response {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                FrameError::TooLarge { len, max: self.max_response },
            ));
        }
        let body = read_body(io, len).await?;
        postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Self::Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = req
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            .and_then(|req| encode_frame(&req, self.max_request))?;
        write_frame(io, frame).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Resp) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = encode_frame(&res, self.max_response);
        write_frame(io, frame?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    type TestCodec = PostcardCodec<Vec<u32>, String>;
    const LIMIT: usize = 64;

    fn proto() -> StreamProtocol {
        StreamProtocol::new("/meshgram/test/1")
    }

    async fn round_trip(req: Vec<u32>) -> io::Result<Result<Vec<u32>, FrameError>> {
        let mut codec = TestCodec::new(LIMIT, LIMIT);
        let mut wire = Cursor::new(Vec::new());
        codec.write_request(&proto(), &mut wire, Ok(req)).await?;
        codec.read_request(&proto(), &mut Cursor::new(wire.into_inner())).await
    }

    #[tokio::test]
    async fn sizes_at_and_around_the_limit() {
        // postcard: 1 length byte + 1 byte per small u32.
        for n in [0usize, 1, LIMIT - 1] {
            assert_eq!(round_trip(vec![1; n]).await.unwrap().unwrap().len(), n);
        }
        assert!(round_trip(vec![1; LIMIT]).await.is_err(), "the writer refuses oversized frames");
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_become_frame_errors() {
        let mut codec = TestCodec::new(LIMIT, LIMIT);
        let huge = (u32::MAX).to_be_bytes().to_vec();
        let got = codec.read_request(&proto(), &mut Cursor::new(huge)).await.unwrap();
        assert!(matches!(got, Err(FrameError::TooLarge { .. })));

        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend([0xff, 0xff, 0xff]);
        let got = codec.read_request(&proto(), &mut Cursor::new(garbage)).await.unwrap();
        assert!(matches!(got, Err(FrameError::Malformed(_))));

        let truncated = 10u32.to_be_bytes().to_vec();
        assert!(codec.read_request(&proto(), &mut Cursor::new(truncated)).await.is_err());
    }
}
