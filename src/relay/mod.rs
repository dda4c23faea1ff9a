//! Relay: moves a dial's bytes between two stream ends without parsing them.
//!
//! Invariants:
//! - After `ConnectionEstablished`, HTTP/2 DATA payloads are forwarded
//!   verbatim (the same `Bytes`, never decoded, never copied).
//! - Receive-side flow-control capacity is released only after the chunk was
//!   handed to the other side, and a sender waits for send capacity before
//!   it queues more, so memory per stream is bounded.
//! - A pump yields to the shard after every chunk when its time slice is up
//!   (glommio has no task budget of its own).
//! - The response direction decides when a call is over; a failing request
//!   direction aborts the call.

pub mod handshake;
pub mod splice;

use std::future::poll_fn;

use bytes::Bytes;
use h2::{RecvStream, SendStream};

use crate::runtime::pipe::{Item, PipeRx, PipeTx};
use crate::telemetry::Counter;
use crate::wire::status::{Code, Status};

/// Why a relay stopped early; each variant has a static label.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// An HTTP/2 stream failed or was reset.
    #[error("stream failed: {0}")]
    H2(#[from] h2::Error),
    /// The other shard's half of the stream vanished.
    #[error("cross-shard pipe broken")]
    Broken,
}

impl RelayError {
    /// Static label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RelayError::H2(e) if e.is_reset() => "stream_reset",
            RelayError::H2(e) if e.is_io() => "io",
            RelayError::H2(_) => "h2",
            RelayError::Broken => "pipe_broken",
        }
    }

    /// Status to report for this failure.
    pub fn status(&self) -> Status {
        Status::new(Code::Unavailable, self.to_string())
    }
}

/// One item from a source.
pub enum Chunk {
    /// Payload.
    Data(Bytes),
    /// End of this direction, with the call status if it carries one.
    End(Option<Status>),
}

/// Where relayed bytes come from.
pub trait Source {
    /// The next chunk.
    fn next(&mut self) -> impl std::future::Future<Output = Result<Chunk, RelayError>>;
    /// `n` bytes were passed on: return them to the sender's window.
    fn release(&mut self, n: usize);
}

/// Where relayed bytes go.
pub trait Sink {
    /// Queues a chunk, waiting for capacity first.
    fn send(&mut self, b: Bytes) -> impl std::future::Future<Output = Result<(), RelayError>>;
    /// Ends this direction.
    fn end(&mut self, s: Option<Status>) -> impl std::future::Future<Output = Result<(), RelayError>>;
}

/// An HTTP/2 receive half; `trailers` reads the status at the end.
pub struct H2Source {
    /// The stream.
    pub rx: RecvStream,
    /// Whether this direction ends with trailers (responses).
    pub trailers: bool,
}

impl Source for H2Source {
    async fn next(&mut self) -> Result<Chunk, RelayError> {
        match poll_fn(|cx| self.rx.poll_data(cx)).await {
            Some(Ok(b)) => Ok(Chunk::Data(b)),
            Some(Err(e)) => Err(e.into()),
            None if self.trailers => {
                let t = poll_fn(|cx| self.rx.poll_trailers(cx)).await?;
                Ok(Chunk::End(t.as_ref().and_then(Status::from_headers)))
            }
            None => Ok(Chunk::End(None)),
        }
    }

    fn release(&mut self, n: usize) {
        let _ = self.rx.flow_control().release_capacity(n);
    }
}

/// Waits until `tx` has send capacity for at least one byte.
pub async fn wait_capacity(tx: &mut SendStream<Bytes>, want: usize) -> Result<(), RelayError> {
    if want == 0 {
        return Ok(());
    }
    tx.reserve_capacity(want);
    while tx.capacity() == 0 {
        match poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(RelayError::H2(h2::Error::from(h2::Reason::CANCEL))),
        }
    }
    Ok(())
}

/// An HTTP/2 send half; `trailers` ends with a status (responses).
pub struct H2Sink {
    /// The stream.
    pub tx: SendStream<Bytes>,
    /// Whether this direction ends with trailers.
    pub trailers: bool,
}

impl Sink for H2Sink {
    async fn send(&mut self, b: Bytes) -> Result<(), RelayError> {
        wait_capacity(&mut self.tx, b.len()).await?;
        self.tx.send_data(b, false)?;
        Ok(())
    }

    async fn end(&mut self, s: Option<Status>) -> Result<(), RelayError> {
        match (self.trailers, s) {
            (true, Some(s)) => self.tx.send_trailers(s.to_trailers())?,
            (true, None) => {
                self.tx.send_trailers(Status::new(Code::Unknown, "upstream ended without a status").to_trailers())?
            }
            (false, _) => self.tx.send_data(Bytes::new(), true)?,
        }
        Ok(())
    }
}

impl Source for PipeRx {
    async fn next(&mut self) -> Result<Chunk, RelayError> {
        match self.recv().await {
            Some(Item::Data(b)) => Ok(Chunk::Data(b)),
            Some(Item::End(s)) => Ok(Chunk::End(s)),
            None => Err(RelayError::Broken),
        }
    }

    fn release(&mut self, _n: usize) {}
}

impl Sink for PipeTx {
    async fn send(&mut self, b: Bytes) -> Result<(), RelayError> {
        PipeTx::send(self, Item::Data(b)).await.map_err(|_| RelayError::Broken)
    }

    async fn end(&mut self, s: Option<Status>) -> Result<(), RelayError> {
        PipeTx::send(self, Item::End(s)).await.map_err(|_| RelayError::Broken)
    }
}

/// Forwards one direction until its end; returns the status it ended with.
pub async fn pump<S: Source, K: Sink>(
    src: &mut S,
    sink: &mut K,
    bytes: &Counter,
) -> Result<Option<Status>, RelayError> {
    loop {
        match src.next().await? {
            Chunk::Data(b) if b.is_empty() => {}
            Chunk::Data(b) => {
                let n = b.len();
                sink.send(b).await?;
                src.release(n);
                bytes.add(n as u64);
                glommio::yield_if_needed().await;
            }
            Chunk::End(s) => {
                sink.end(s.clone()).await?;
                return Ok(s);
            }
        }
    }
}

/// Runs both directions of a call; returns once the response direction has
/// ended (its status), or the first failure.
pub async fn relay<S1: Source, K1: Sink, S2: Source, K2: Sink>(
    up: (&mut S1, &mut K1),
    down: (&mut S2, &mut K2),
    bytes_up: &Counter,
    bytes_down: &Counter,
) -> Result<Option<Status>, RelayError> {
    let (us, uk) = up;
    let (ds, dk) = down;
    futures_lite::future::or(pump(ds, dk, bytes_down), async {
        match pump(us, uk, bytes_up).await {
            Ok(_) => std::future::pending().await,
            Err(e) => Err(e),
        }
    })
    .await
}
