//! Relay: the session layer. Moves a dial's bytes between two stream ends
//! without parsing them, over any link kind.
//!
//! - [`grpc`]: the one gRPC stream type ([`GrpcRecv`] / [`GrpcSend`]) that
//!   owns the decoder and the flow-control credit.
//! - [`call`]: opening and answering a dial.
//! - [`splice`]: a dial joined to a byte stream (the agent's target, a
//!   client's local socket or stdio).
//! - this module: the verbatim relay between two dial streams, or a dial
//!   stream and a cross-shard [`Pipe`](crate::runtime::pipe).
//!
//! Invariants:
//! - After `ConnectionEstablished`, HTTP/2 DATA payloads are forwarded
//!   verbatim (the same `Bytes`, never decoded, never copied), and the far
//!   end's trailers are forwarded as received.
//! - Credit rule: a chunk's receive credit is returned only after it was
//!   handed on (written into a capacity-checked h2 stream, or accepted by a
//!   bounded pipe). See [`grpc`].
//! - A pump yields to the shard after a chunk when its time slice is up
//!   (glommio has no task budget of its own).
//! - The response direction decides when a call is over. A failure in either
//!   direction cancels the other hop: the caller gets the error's trailers,
//!   the upstream gets RST_STREAM(CANCEL), which reaches the agent and
//!   closes its target connection.

pub mod call;
pub mod grpc;
pub mod splice;

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::time::Instant;

use bytes::Bytes;
use http::HeaderMap;

pub use grpc::{GrpcRecv, GrpcSend};

use crate::runtime::pipe::{PipeRx, PipeTx};
use crate::runtime::stats::{Counter, Histogram};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::status::Status;

/// What crosses a shard boundary in a [`PipeTx`] / [`PipeRx`].
#[derive(Debug)]
pub enum Item {
    /// Payload (verbatim HTTP/2 DATA payload).
    Data(Bytes),
    /// The end of this direction, with the far end's trailers when it has
    /// them (boxed: it keeps every pipe slot, a preallocated array, at the
    /// size of a `Data` or a `Fail`, half of an inline `HeaderMap`'s).
    End(Option<Box<HeaderMap>>),
    /// The other side failed.
    Fail(Error),
}

/// One item from a source.
pub enum Chunk {
    /// Payload.
    Data(Bytes),
    /// End of this direction, with trailers when it carries them.
    End(Option<HeaderMap>),
}

/// Where relayed bytes come from.
pub trait Source {
    /// The next chunk. Asking for it returns the credit of the previous one.
    fn next(&mut self) -> impl std::future::Future<Output = Result<Chunk, Error>>;
}

/// Where relayed bytes go.
pub trait Sink {
    /// Queues a chunk, waiting for capacity first.
    fn send(&mut self, b: Bytes) -> impl std::future::Future<Output = Result<(), Error>>;
    /// Ends this direction (trailers verbatim on a response).
    fn end(&mut self, t: Option<HeaderMap>) -> impl std::future::Future<Output = Result<(), Error>>;
    /// Ends this direction because of `e`: error trailers on a response,
    /// RST_STREAM(CANCEL) on a request, a `Fail` through a pipe.
    fn fail(&mut self, e: &Error) -> impl std::future::Future<Output = ()>;
}

impl Source for GrpcRecv {
    async fn next(&mut self) -> Result<Chunk, Error> {
        match self.chunk().await? {
            Some(b) => Ok(Chunk::Data(b)),
            None => Ok(Chunk::End(self.trailers().await?)),
        }
    }
}

impl Sink for GrpcSend {
    async fn send(&mut self, b: Bytes) -> Result<(), Error> {
        GrpcSend::send(self, b).await
    }

    async fn end(&mut self, t: Option<HeaderMap>) -> Result<(), Error> {
        match t {
            Some(t) if self.is_response() => self.trailers(t),
            None if self.is_response() => {
                let e = Error::new(
                    crate::wire::status::Code::Unknown,
                    Side::Agent,
                    Retry::Unsafe,
                    Label::Upstream,
                    "the upstream ended the call without a status",
                );
                self.trailers(e.to_trailers())
            }
            _ => self.close(),
        }
    }

    async fn fail(&mut self, e: &Error) {
        if self.is_response() {
            if self.trailers(e.to_trailers()).is_err() {
                self.reset(h2::Reason::CANCEL);
            }
        } else {
            self.reset(h2::Reason::CANCEL);
        }
    }
}

fn broken() -> Error {
    Error::unavailable(Side::Proxy, Retry::Unsafe, Label::PipeBroken, "the other shard's half of the dial vanished")
}

impl Source for PipeRx<Item> {
    async fn next(&mut self) -> Result<Chunk, Error> {
        match self.recv().await {
            Some(Item::Data(b)) => Ok(Chunk::Data(b)),
            Some(Item::End(t)) => Ok(Chunk::End(t.map(|t| *t))),
            Some(Item::Fail(e)) => Err(e),
            None => Err(broken()),
        }
    }
}

impl Sink for PipeTx<Item> {
    async fn send(&mut self, b: Bytes) -> Result<(), Error> {
        PipeTx::send(self, Item::Data(b)).await.map_err(|_| broken())
    }

    async fn end(&mut self, t: Option<HeaderMap>) -> Result<(), Error> {
        PipeTx::send(self, Item::End(t.map(Box::new))).await.map_err(|_| broken())
    }

    async fn fail(&mut self, e: &Error) {
        let _ = PipeTx::send(self, Item::Fail(e.clone())).await;
    }
}

/// What one direction of one call moved: its payload bytes, and the status
/// its far end ended it with (read from the trailers once, at the end).
/// Shard-local plain cells, owned by the call (the audit reads them after
/// the relay; alternatives rejected: returning the counts from [`relay`],
/// which loses the losing direction's count when `or` drops it).
#[derive(Debug, Default)]
pub struct Tally {
    /// Payload bytes forwarded (verbatim DATA payloads).
    pub bytes: Cell<u64>,
    /// The `grpc-status` of the trailers forwarded, if any.
    pub status: RefCell<Option<Status>>,
}

impl Tally {
    /// Counts `n` more bytes.
    pub fn add(&self, n: u64) {
        self.bytes.set(self.bytes.get() + n);
    }
}

/// Where the time to first byte of a direction is recorded: the first DATA
/// forwarded records `since.elapsed()` in `hist`, once.
pub struct FirstByte<'a> {
    /// The shard's histogram.
    pub hist: &'a Histogram,
    /// When the dial arrived.
    pub since: Instant,
}

impl FirstByte<'_> {
    /// Records the time since the dial arrived.
    pub fn record(self) {
        self.hist.record(self.since.elapsed());
    }
}

/// Forwards one direction until its end.
pub async fn pump<S: Source, K: Sink>(
    src: &mut S,
    sink: &mut K,
    bytes: &Counter,
    tally: &Tally,
    mut first: Option<FirstByte<'_>>,
) -> Result<(), Error> {
    loop {
        match src.next().await? {
            Chunk::Data(b) if b.is_empty() => {}
            Chunk::Data(b) => {
                if let Some(f) = first.take() {
                    f.record();
                }
                bytes.add(b.len() as u64);
                tally.add(b.len() as u64);
                sink.send(b).await?;
                glommio::yield_if_needed().await;
            }
            Chunk::End(t) => {
                if let Some(t) = &t {
                    *tally.status.borrow_mut() = Status::from_headers(t);
                }
                return sink.end(t).await;
            }
        }
    }
}

/// One direction of a call: where it comes from and where it goes.
pub struct Leg<'a, S, K> {
    /// Source.
    pub src: &'a mut S,
    /// Sink.
    pub sink: &'a mut K,
    /// Payload bytes counted here (the shard's counter).
    pub bytes: &'a Counter,
    /// And here (this call's own).
    pub tally: &'a Tally,
    /// Time to the first DATA forwarded, when measured.
    pub first: Option<FirstByte<'a>>,
}

/// Runs both directions of a call: `up` (caller → callee) and `down`
/// (callee → caller). Returns once `down` has ended, or at the first
/// failure, after cancelling both hops (see the module invariants).
pub async fn relay<S1: Source, K1: Sink, S2: Source, K2: Sink>(
    up: Leg<'_, S1, K1>,
    down: Leg<'_, S2, K2>,
) -> Result<(), Error> {
    let r = futures_lite::future::or(pump(down.src, down.sink, down.bytes, down.tally, down.first), async {
        match pump(up.src, up.sink, up.bytes, up.tally, up.first).await {
            Ok(()) => std::future::pending().await,
            Err(e) => Err(e),
        }
    })
    .await;
    if let Err(e) = &r {
        down.sink.fail(e).await;
        up.sink.fail(e).await;
    }
    r
}
