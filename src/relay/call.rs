//! Opening and answering a dial: the `DialRequest` → `ConnectionEstablished`
//! exchange that precedes relaying, on any link kind.
//!
//! Invariants:
//! - The first message is size-checked and validated before any routing.
//! - A dial is answered either with HTTP 200 + a body, or with a
//!   trailers-only gRPC status; a far end's refusal is answered with its own
//!   trailers, verbatim.
//! - Everything that fails before `ConnectionEstablished` is retry-safe
//!   unless the far end's status says otherwise: no payload byte has been
//!   sent yet (the bytes after the `DialRequest` wait for establishment).
//! - Request heads are built from static parts: no per-dial `format!` or URI
//!   parsing.

use std::future::poll_fn;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use http::header::{CONTENT_TYPE, TE};
use http::{HeaderValue, Request, Response, Uri};

use super::grpc::{GrpcRecv, GrpcSend};
use crate::runtime::timeout;
use crate::wire::codec::{Event, FrameDecoder};
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::{pb, DialTarget};

const GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const TRAILERS: HeaderValue = HeaderValue::from_static("trailers");

/// Header carrying how many peer links a dial has crossed.
pub const HOPS_HEADER: &str = "ringpeer-hops";
const HOPS: [HeaderValue; 4] = [
    HeaderValue::from_static("0"),
    HeaderValue::from_static("1"),
    HeaderValue::from_static("2"),
    HeaderValue::from_static("3"),
];

/// Header carrying the client's identity (`spiffe://<cluster>/client/<name>`)
/// on every dial a proxy sends on: to a peer proxy (which checks its own
/// grants against it) and to an agent (which checks its per-service allow
/// list). Set only by proxies; a proxy never takes it from a client.
pub const CLIENT_ID_HEADER: &str = "ringpeer-client-id";

/// An established dial, seen from the side that opened it.
pub struct Established {
    /// Request body (towards the callee).
    pub send: GrpcSend,
    /// Response body; its decoder is positioned after `ConnectionEstablished`.
    pub recv: GrpcRecv,
    /// Raw response bytes read so far, `ConnectionEstablished` included, for
    /// a relay to forward verbatim.
    pub held: Vec<Bytes>,
}

fn closed(far: Side, e: &h2::Error) -> Error {
    let mut err = Error::from_h2(far, false, e).with_retry(Retry::Safe);
    // TLS 1.3: the far end's verdict on our certificate arrives as the
    // first read of the connection, so a refusal shows up here.
    if let Some(why) = crate::transport::verify::explain_refusal(e) {
        err.message = format!("the {} refused our certificate: {why}", far.name()).into();
    }
    err
}

/// Opens a dial stream at `uri` on `send`, sends `first` (an encoded
/// `DialRequest`) and waits for `ConnectionEstablished` or the callee's
/// status, within `deadline`.
pub async fn open(
    send: &mut SendRequest<Bytes>,
    uri: &Uri,
    hop: Hop<'_>,
    first: Bytes,
    far: Side,
    deadline: Duration,
) -> Result<Established, Error> {
    open_bounded(send, uri, hop, first, far, deadline, deadline).await
}

/// A dial as a proxy sends it on: the encoded `DialRequest` and the
/// client identity header value (both reference-counted, cheap to clone
/// for each upstream tried).
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The encoded `DialRequest` frame.
    pub first: Bytes,
    /// The client's identity, for [`CLIENT_ID_HEADER`].
    pub client: Option<HeaderValue>,
}

impl Outgoing {
    /// The headers for a dial that has crossed `hops` peer links.
    pub fn hop(&self, hops: u8) -> Hop<'_> {
        Hop { hops, client: self.client.as_ref() }
    }
}

/// What a dial's request headers say about where it came from.
#[derive(Clone, Copy, Default)]
pub struct Hop<'a> {
    /// Peer links crossed so far.
    pub hops: u8,
    /// The client's identity ([`CLIENT_ID_HEADER`]), when a proxy forwards.
    pub client: Option<&'a HeaderValue>,
}

/// [`open`], where the callee must also answer the request headers within
/// `headers_within` (a proxy answers them as soon as it has read the
/// `DialRequest`). A callee that does not is frozen or black-holed:
/// the error is retry-safe with label `unresponsive`, so failover moves on
/// with the rest of the deadline.
pub async fn open_bounded(
    send: &mut SendRequest<Bytes>,
    uri: &Uri,
    hop: Hop<'_>,
    first: Bytes,
    far: Side,
    headers_within: Duration,
    deadline: Duration,
) -> Result<Established, Error> {
    let fut = async {
        poll_fn(|cx| send.poll_ready(cx)).await.map_err(|e| closed(far, &e))?;
        let mut req = Request::new(());
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.clone();
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, GRPC);
        h.insert(TE, TRAILERS);
        if hop.hops > 0 {
            h.insert(HOPS_HEADER, HOPS[usize::from(hop.hops.min(3))].clone());
        }
        if let Some(c) = hop.client {
            h.insert(CLIENT_ID_HEADER, c.clone());
        }
        let (resp, tx) = send.send_request(req, false).map_err(|e| closed(far, &e))?;
        let mut tx = GrpcSend::request(tx, far);
        tx.send_now(first)?;
        let resp = match timeout(headers_within, resp).await {
            Ok(r) => r.map_err(|e| closed(far, &e))?,
            Err(_) => {
                let m = format!("the {} did not answer the dial within {headers_within:?}", far.name());
                return Err(Error::unavailable(far, Retry::Safe, Label::Unresponsive, m));
            }
        };
        if resp.status() != 200 {
            let m = format!("the {} answered HTTP {}", far.name(), resp.status());
            return Err(Error::unavailable(far, Retry::Safe, Label::NotEstablished, m));
        }
        let (parts, body) = resp.into_parts();
        if let Some(e) = Error::from_trailers(far, parts.headers) {
            // Trailers-only answer: the callee refused.
            return Err(e);
        }
        let mut rx = GrpcRecv::new(body, FrameDecoder::new(), far);
        let mut held = Vec::with_capacity(1);
        loop {
            let Some(c) = rx.chunk().await.map_err(|e| e.with_retry(Retry::Safe))? else {
                let t = rx.trailers().await?;
                return Err(t.and_then(|t| Error::from_trailers(far, t)).unwrap_or_else(|| {
                    let m = format!("the {} ended the dial before it was established", far.name());
                    Error::unavailable(far, Retry::Safe, Label::NotEstablished, m)
                }));
            };
            held.push(c.clone());
            rx.decoder().push(c);
            match rx.decoder().decode_next().map_err(|e| Error::from(e).on(far))? {
                Some(Event::Frame(pb::Frame { message: Some(pb::frame::Message::ConnectionEstablished(_)) })) => {
                    rx.set_established();
                    tx.set_established();
                    return Ok(Established { send: tx, recv: rx, held });
                }
                Some(_) => {
                    let m = format!("the {} sent data before ConnectionEstablished", far.name());
                    return Err(Error::unavailable(far, Retry::Safe, Label::NotEstablished, m));
                }
                None => {}
            }
        }
    };
    timeout(deadline, fut).await.map_err(|_| {
        let m = format!("the {} did not establish the dial before the deadline", far.name());
        Error::deadline(far, m).with_retry(Retry::Safe)
    })?
}

/// Reads the first message of a dial (the `DialRequest`) within `deadline`.
/// The decoder keeps whatever followed it, undecoded.
pub async fn read_dial_request(rx: &mut GrpcRecv, deadline: Duration) -> Result<DialTarget, Error> {
    let fut = async {
        match rx.next().await? {
            Some(Event::Frame(f)) => DialTarget::from_frame(f).map_err(|s| Error::bad_request(s.message)),
            Some(Event::Data(_)) => Err(Error::bad_request("Data before the DialRequest")),
            None => Err(Error::bad_request("the stream ended before a DialRequest")),
        }
    };
    timeout(deadline, fut).await.map_err(|_| Error::deadline(Side::Client, "no DialRequest before the deadline"))?
}

/// Answers a request with 200 and returns the response body stream.
pub fn answer_ok(respond: &mut SendResponse<Bytes>, far: Side) -> Result<GrpcSend, Error> {
    let mut resp = Response::new(());
    resp.headers_mut().insert(CONTENT_TYPE, GRPC);
    respond.send_response(resp, false).map(|tx| GrpcSend::response(tx, far)).map_err(|e| Error::from_h2(far, false, &e))
}

/// Answers a request with a trailers-only status: the error's own trailers
/// when it carries a far end's, else its code and message.
pub fn answer_error(mut respond: SendResponse<Bytes>, e: &Error) {
    let mut resp = Response::new(());
    *resp.headers_mut() = e.to_trailers();
    resp.headers_mut().insert(CONTENT_TYPE, GRPC);
    let _ = respond.send_response(resp, true);
}

/// The encoded `ConnectionEstablished` frame.
pub fn established() -> Bytes {
    // Frame{ConnectionEstablished{}}: field 2, length 0.
    Bytes::from_static(&[0, 0, 0, 0, 2, 0x12, 0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_static_established_frame_is_the_prost_encoding() {
        assert_eq!(established(), crate::wire::codec::encode_msg(&crate::wire::established_frame()));
    }
}
