//! Opening and answering dials: the DialRequest / ConnectionEstablished
//! exchange that precedes relaying, and gRPC responses.
//!
//! Invariants: the first message is size-checked and validated before any
//! routing; a dial is answered either with HTTP 200 + bytes, or with a
//! trailers-only gRPC status; establishment runs under a deadline.

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response};

use crate::runtime::timeout;
use crate::wire::codec::{Event, FrameDecoder};
use crate::wire::pb;
use crate::wire::status::{Code, Status};
use crate::wire::DialTarget;

const GRPC: &str = "application/grpc";

/// Answers a request with a trailers-only status.
pub fn respond_status(mut respond: SendResponse<Bytes>, s: &Status) {
    let mut resp = Response::builder().status(200).header("content-type", GRPC).body(()).expect("static response");
    s.write_to(resp.headers_mut());
    let _ = respond.send_response(resp, true);
}

/// Answers a request with 200 and returns the response body stream.
pub fn respond_ok(respond: &mut SendResponse<Bytes>) -> Result<SendStream<Bytes>, Status> {
    let resp = Response::builder().status(200).header("content-type", GRPC).body(()).expect("static response");
    respond.send_response(resp, false).map_err(|e| Status::new(Code::Unavailable, format!("cannot respond: {e}")))
}

/// Reads the first message of a dial (the `DialRequest`). Returns the target
/// and the decoder, positioned after it (its rest is still undecoded).
pub async fn read_dial_request(rx: &mut RecvStream, deadline: Duration) -> Result<(DialTarget, FrameDecoder), Status> {
    let mut dec = FrameDecoder::new();
    let fut = async {
        loop {
            match poll_fn(|cx| rx.poll_data(cx)).await {
                Some(Ok(c)) => {
                    let _ = rx.flow_control().release_capacity(c.len());
                    dec.push(c);
                    match dec.decode_next().map_err(|e| e.status())? {
                        Some(Event::Frame(f)) => return DialTarget::from_frame(f),
                        Some(Event::Data(_)) => {
                            return Err(Status::new(Code::InvalidArgument, "Data before the DialRequest"))
                        }
                        None => {}
                    }
                }
                Some(Err(e)) => return Err(Status::new(Code::Unavailable, format!("stream failed: {e}"))),
                None => return Err(Status::new(Code::InvalidArgument, "the stream ended before a DialRequest")),
            }
        }
    };
    let target = timeout(deadline, fut)
        .await
        .map_err(|_| Status::new(Code::DeadlineExceeded, "no DialRequest before the deadline"))??;
    Ok((target, dec))
}

/// An established dial, seen from the side that opened it.
pub struct Opened {
    /// Request body (towards the callee).
    pub tx: SendStream<Bytes>,
    /// Response body (from the callee).
    pub rx: RecvStream,
    /// Raw response bytes read so far, ConnectionEstablished included, to
    /// forward verbatim.
    pub held: Vec<Bytes>,
    /// A decoder positioned after ConnectionEstablished.
    pub dec: FrameDecoder,
}

/// Message of the status for a stream the callee refused before
/// processing it (over its stream limit): safe to retry elsewhere.
pub const REFUSED: &str = "the callee refused the stream unprocessed (stream limit)";

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    Status::new(Code::Unavailable, format!("{what}: {e}"))
}

fn h2_failed(what: &str, e: h2::Error) -> Status {
    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
        return Status::new(Code::Unavailable, REFUSED);
    }
    unavailable(what, e)
}

/// Opens a dial stream on `send` at `path` (`authority` names the callee),
/// sends `first` (an encoded DialRequest) and waits for
/// ConnectionEstablished or the callee's status.
pub async fn open_dial(
    send: &mut SendRequest<Bytes>,
    authority: &str,
    path: &str,
    first: Bytes,
    deadline: Duration,
) -> Result<Opened, Status> {
    open_dial_hops(send, authority, path, first, deadline, 0).await
}

/// Header carrying how many peer links a dial has crossed.
pub const HOPS_HEADER: &str = "ringpeer-hops";

/// [`open_dial`], marking the dial as having crossed `hops` peer links.
pub async fn open_dial_hops(
    send: &mut SendRequest<Bytes>,
    authority: &str,
    path: &str,
    first: Bytes,
    deadline: Duration,
    hops: u8,
) -> Result<Opened, Status> {
    const HOPS: [&str; 4] = ["0", "1", "2", "3"];
    let fut = async {
        poll_fn(|cx| send.poll_ready(cx)).await.map_err(|e| unavailable("connection closed", e))?;
        let mut req =
            Request::post(format!("https://{authority}{path}")).header("content-type", GRPC).header("te", "trailers");
        if hops > 0 {
            req = req.header(HOPS_HEADER, HOPS[usize::from(hops.min(3))]);
        }
        let req = req.body(()).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let (resp, mut tx) = send.send_request(req, false).map_err(|e| unavailable("cannot open stream", e))?;
        tx.send_data(first, false).map_err(|e| unavailable("cannot send DialRequest", e))?;
        let resp = resp.await.map_err(|e| h2_failed("stream failed", e))?;
        if resp.status() != 200 {
            return Err(Status::new(Code::Unavailable, format!("callee answered HTTP {}", resp.status())));
        }
        if let Some(s) = Status::from_headers(resp.headers()) {
            // Trailers-only answer: the callee refused.
            return Err(if s.is_ok() { Status::new(Code::Unavailable, "callee ended the dial at once") } else { s });
        }
        let mut rx = resp.into_body();
        let mut held = Vec::new();
        let mut dec = FrameDecoder::new();
        loop {
            match poll_fn(|cx| rx.poll_data(cx)).await {
                Some(Ok(c)) => {
                    let _ = rx.flow_control().release_capacity(c.len());
                    held.push(c.clone());
                    dec.push(c);
                    match dec.decode_next().map_err(|e| e.status())? {
                        Some(Event::Frame(pb::Frame {
                            message: Some(pb::frame::Message::ConnectionEstablished(_)),
                        })) => {
                            return Ok(Opened { tx, rx, held, dec });
                        }
                        Some(_) => {
                            return Err(Status::new(Code::Unavailable, "callee sent data before ConnectionEstablished"))
                        }
                        None => {}
                    }
                }
                Some(Err(e)) => return Err(unavailable("stream failed", e)),
                None => {
                    let t = poll_fn(|cx| rx.poll_trailers(cx)).await.map_err(|e| unavailable("stream failed", e))?;
                    return Err(t.as_ref().and_then(Status::from_headers).filter(|s| !s.is_ok()).unwrap_or_else(
                        || Status::new(Code::Unavailable, "callee ended the dial before it was established"),
                    ));
                }
            }
        }
    };
    timeout(deadline, fut)
        .await
        .map_err(|_| Status::new(Code::DeadlineExceeded, "the dial was not established before the deadline"))?
}
