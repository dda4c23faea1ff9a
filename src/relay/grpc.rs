//! The gRPC stream type every link kind uses: [`GrpcRecv`] (the decoder and
//! the receive-side flow-control credit) and [`GrpcSend`] (send capacity,
//! half-close, trailers, reset). Opening and answering a call is
//! [`super::call`].
//!
//! Invariants:
//! - **One credit rule.** Receive credit for a DATA chunk is returned to the
//!   sender only when the caller asks for the next item, i.e. after it has
//!   written (or handed to a bounded queue) everything it took from that
//!   chunk. A reader that stops reading therefore stops its sender, and a
//!   stream holds at most its window plus one chunk at this hop.
//! - A send waits for stream capacity before it queues, so the h2 send
//!   buffer holds at most one window plus one chunk per stream.
//! - Every failure is an [`Error`] attributed to the far end ([`Side`]) and
//!   marked retry-safe only while the far end has not acted on the dial.
//!
//! Alternative rejected: releasing credit on receipt (what most h2 examples
//! do). It is simpler, but then a slow reader's bytes pile up in our buffers
//! with nothing to stop the sender.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderMap;

use crate::runtime::budget::BufMeter;
use crate::wire::codec::{CodecError, Event, FrameDecoder, MsgDecoder};
use crate::wire::error::{Error, Side};

/// A decoder of a gRPC message stream.
pub trait Decode {
    /// What one decoded item is.
    type Item;
    /// Appends a received chunk.
    fn push(&mut self, b: Bytes);
    /// The next complete item, if any.
    fn next(&mut self) -> Result<Option<Self::Item>, CodecError>;
    /// Checks the stream did not end inside a message.
    fn finish(&self) -> Result<(), CodecError>;
}

impl Decode for FrameDecoder {
    type Item = Event;
    fn push(&mut self, b: Bytes) {
        FrameDecoder::push(self, b)
    }
    fn next(&mut self) -> Result<Option<Event>, CodecError> {
        self.decode_next()
    }
    fn finish(&self) -> Result<(), CodecError> {
        FrameDecoder::finish(self)
    }
}

/// A decoder of whole messages of type `M` (control streams).
pub struct Msgs<M>(MsgDecoder, std::marker::PhantomData<M>);

impl<M> Msgs<M> {
    /// Messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Msgs(MsgDecoder::new(limit), std::marker::PhantomData)
    }
}

impl<M: prost::Message + Default> Decode for Msgs<M> {
    type Item = M;
    fn push(&mut self, b: Bytes) {
        self.0.push(&b)
    }
    fn next(&mut self) -> Result<Option<M>, CodecError> {
        self.0.decode_next()
    }
    fn finish(&self) -> Result<(), CodecError> {
        Ok(())
    }
}

/// The receive half of a gRPC call.
pub struct GrpcRecv<D = FrameDecoder> {
    rx: RecvStream,
    dec: D,
    /// Credit taken from the window and not yet returned.
    owed: usize,
    far: Side,
    established: bool,
    /// Counts `owed` against the shard's buffer budget, when set.
    meter: Option<BufMeter>,
}

impl<D> Drop for GrpcRecv<D> {
    fn drop(&mut self) {
        if let Some(m) = &self.meter {
            m.sub(self.owed);
        }
    }
}

impl<D: Decode> GrpcRecv<D> {
    /// Wraps a receive stream whose sender is `far`.
    pub fn new(rx: RecvStream, dec: D, far: Side) -> Self {
        GrpcRecv { rx, dec, owed: 0, far, established: false, meter: None }
    }

    /// Counts the received bytes not yet handed on (their credit not yet
    /// returned) in `m`, the shard's buffer meter.
    pub fn meter(&mut self, m: &BufMeter) {
        m.add(self.owed);
        if let Some(old) = self.meter.replace(m.clone()) {
            old.sub(self.owed);
        }
    }

    fn took(&mut self, n: usize) {
        self.owed += n;
        if let Some(m) = &self.meter {
            m.add(n);
        }
    }

    /// Marks the call established: failures from now on are not retry-safe.
    pub fn set_established(&mut self) {
        self.established = true;
    }

    fn h2_error(&self, e: &h2::Error) -> Error {
        Error::from_h2(self.far, self.established, e)
    }

    fn codec_error(&self, e: CodecError) -> Error {
        Error::from(e).on(self.far)
    }

    /// Returns the credit of everything handed out so far.
    fn release(&mut self) {
        if self.owed > 0 {
            let _ = self.rx.flow_control().release_capacity(self.owed);
            if let Some(m) = &self.meter {
                m.sub(self.owed);
            }
            self.owed = 0;
        }
    }

    /// The next decoded item; `None` at END_STREAM. Calling it again means
    /// the caller is done with the items it got: their credit is returned.
    pub async fn next(&mut self) -> Result<Option<D::Item>, Error> {
        loop {
            if let Some(it) = self.dec.next().map_err(|e| self.codec_error(e))? {
                return Ok(Some(it));
            }
            self.release();
            match poll_fn(|cx| self.rx.poll_data(cx)).await {
                Some(Ok(c)) => {
                    self.took(c.len());
                    self.dec.push(c);
                }
                Some(Err(e)) => return Err(self.h2_error(&e)),
                None => {
                    self.dec.finish().map_err(|e| self.codec_error(e))?;
                    return Ok(None);
                }
            }
        }
    }

    /// The next DATA payload as received (verbatim, not decoded); `None` at
    /// END_STREAM. The previous chunk's credit is returned first.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        self.release();
        match poll_fn(|cx| self.rx.poll_data(cx)).await {
            Some(Ok(c)) => {
                self.took(c.len());
                Ok(Some(c))
            }
            Some(Err(e)) => Err(self.h2_error(&e)),
            None => Ok(None),
        }
    }

    /// The trailers, after END_STREAM.
    pub async fn trailers(&mut self) -> Result<Option<HeaderMap>, Error> {
        self.release();
        poll_fn(|cx| self.rx.poll_trailers(cx)).await.map_err(|e| self.h2_error(&e))
    }

    /// The decoder (e.g. to take the bytes it holds undecoded).
    pub fn decoder(&mut self) -> &mut D {
        &mut self.dec
    }
}

impl GrpcRecv<FrameDecoder> {
    /// The next Data payload of an established dial (a slice of the
    /// received chunk); `None` at END_STREAM. Any other frame is an error.
    pub async fn next_data(&mut self) -> Result<Option<Bytes>, Error> {
        let far = self.far;
        self.next().await?.map(|ev| data_of(ev, far)).transpose()
    }

    /// Every complete Data payload already decoded from the current chunk,
    /// without waiting (for one vectored write of several messages).
    pub fn ready_data(&mut self, out: &mut Vec<Bytes>) -> Result<(), Error> {
        while let Some(ev) = self.dec.decode_next().map_err(|e| self.codec_error(e))? {
            out.push(data_of(ev, self.far)?);
        }
        Ok(())
    }
}

/// The payload of an established dial's event; any other frame is an error
/// of the side that sent it.
fn data_of(ev: Event, far: Side) -> Result<Bytes, Error> {
    match ev {
        Event::Data(b) => Ok(b),
        Event::Frame(_) => Err(Error::bad_request("unexpected non-Data frame after the dial was established").on(far)),
    }
}

/// The send half of a gRPC call: a request body (ends with END_STREAM) or
/// a response body (ends with trailers).
pub struct GrpcSend {
    tx: SendStream<Bytes>,
    far: Side,
    established: bool,
    response: bool,
}

impl GrpcSend {
    /// A request body towards `far`.
    pub fn request(tx: SendStream<Bytes>, far: Side) -> Self {
        GrpcSend { tx, far, established: false, response: false }
    }

    /// A response body towards `far` (the caller).
    pub fn response(tx: SendStream<Bytes>, far: Side) -> Self {
        GrpcSend { tx, far, established: true, response: true }
    }

    /// Whether this is a response body (ends with trailers).
    pub fn is_response(&self) -> bool {
        self.response
    }

    /// Marks the call established.
    pub fn set_established(&mut self) {
        self.established = true;
    }

    fn h2_error(&self, e: &h2::Error) -> Error {
        Error::from_h2(self.far, self.established, e)
    }

    /// Waits for send capacity, then queues `b` (one DATA frame or more).
    pub async fn send(&mut self, b: Bytes) -> Result<(), Error> {
        if b.is_empty() {
            return Ok(());
        }
        self.tx.reserve_capacity(b.len());
        while self.tx.capacity() == 0 {
            match poll_fn(|cx| self.tx.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(self.h2_error(&e)),
                None => return Err(self.h2_error(&h2::Error::from(h2::Reason::CANCEL))),
            }
        }
        self.tx.send_data(b, false).map_err(|e| self.h2_error(&e))
    }

    /// Asks for `n` bytes of send capacity; whether some is there now (a
    /// send would not wait).
    pub fn reserve_now(&mut self, n: usize) -> bool {
        self.tx.reserve_capacity(n);
        self.tx.capacity() > 0
    }

    /// Queues `b` without waiting for capacity (small control messages).
    pub fn send_now(&mut self, b: Bytes) -> Result<(), Error> {
        self.tx.send_data(b, false).map_err(|e| self.h2_error(&e))
    }

    /// Half-closes: END_STREAM without trailers (request side).
    pub fn close(&mut self) -> Result<(), Error> {
        self.tx.send_data(Bytes::new(), true).map_err(|e| self.h2_error(&e))
    }

    /// Ends the stream with `trailers` (response side), verbatim.
    pub fn trailers(&mut self, trailers: HeaderMap) -> Result<(), Error> {
        self.tx.send_trailers(trailers).map_err(|e| self.h2_error(&e))
    }

    /// Resets the stream (cancels the far end's work).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.tx.send_reset(reason);
    }

    /// Resolves when the far end resets the stream.
    pub async fn reset_by_peer(&mut self) -> h2::Reason {
        poll_fn(|cx| self.tx.poll_reset(cx)).await.unwrap_or(h2::Reason::CANCEL)
    }
}
