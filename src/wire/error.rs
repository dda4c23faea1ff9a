//! The one error type of the data plane.
//!
//! Every failure that can end a dial, on any link, is an [`Error`]: a gRPC
//! [`Code`] (all 17), the [`Side`] that failed, a [`Retry`] class, a static
//! [`Label`] that indexes the metrics, and a message for people.
//!
//! Invariants:
//! - Failover decides on [`Error::retry`], never on the message text.
//! - Building an error from a static message does not allocate; a message
//!   that names something (an agent, an address) allocates once, off the
//!   per-message path (errors end dials, they are not per-byte events).
//! - A label is an enum discriminant, so counting one is an array index.
//!
//! Modelled on pingora's `Error { etype, esource, retry, .. }`. Alternatives
//! rejected: `anyhow` (allocates, loses the code and the retry class), one
//! error enum per layer (the caller then has to map each into a status by
//! hand, which is how the old code ended up matching strings).

use std::borrow::Cow;
use std::fmt;

use http::HeaderMap;

use super::status::{Code, Status};

/// The party whose failure ended the dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The caller (bad request, cancel, reset, vanished).
    Client,
    /// This proxy (a limit, an internal failure, no route).
    Proxy,
    /// Another proxy reached over a peer link.
    Peer,
    /// The agent at the end of a tunnel.
    Agent,
    /// The agent's target service.
    Target,
}

impl Side {
    /// Lower-case name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Proxy => "proxy",
            Side::Peer => "peer",
            Side::Agent => "agent",
            Side::Target => "target",
        }
    }
}

/// Whether another upstream may be tried after this failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Nothing reached the far end (refused unprocessed, not yet
    /// established, connect failed): another upstream may be tried.
    Safe,
    /// The far end may have acted on the dial: do not repeat it.
    Unsafe,
    /// The request itself is at fault (or the caller left): no upstream
    /// would do better.
    Never,
}

macro_rules! labels {
    ($($v:ident => $s:literal,)*) => {
        /// Static metric labels, one per kind of failure.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Label { $($v,)* }

        impl Label {
            /// Every label, in index order.
            pub const ALL: &'static [Label] = &[$(Label::$v,)*];
            /// Number of labels (the length of a per-label counter array).
            pub const COUNT: usize = Self::ALL.len();

            /// The label text, e.g. `no_route`.
            pub fn name(self) -> &'static str {
                match self { $(Label::$v => $s,)* }
            }

            /// Index into a per-label counter array.
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

/// Trailer naming the [`Label`] of an error a ringpeer process answered.
pub const LABEL_HEADER: &str = "ringpeer-label";

labels! {
    NoRoute => "no_route",
    NotLoaded => "not_loaded",
    NotHeldHere => "not_held_here",
    NoService => "no_service",
    BadRequest => "bad_request",
    Unimplemented => "unimplemented",
    PermissionDenied => "permission_denied",
    Loop => "forwarding_loop",
    DialTimeout => "dial_timeout",
    Cancelled => "cancelled",
    StreamReset => "stream_reset",
    Refused => "refused_stream",
    GoAway => "goaway",
    NotEstablished => "not_established",
    ConnectionLost => "connection_lost",
    ShardStopped => "shard_stopped",
    PipeBroken => "pipe_broken",
    TunnelGone => "tunnel_gone",
    PeerUnreachable => "peer_unreachable",
    PeerBackoff => "peer_backoff",
    Unresponsive => "unresponsive",
    ResetFlood => "reset_flood",
    PingFlood => "ping_flood",
    SettingsFlood => "settings_flood",
    LinkSuspect => "link_suspect",
    TargetConnect => "target_connect",
    TargetIo => "target_io",
    Connect => "connect",
    ConnectTimeout => "connect_timeout",
    TlsHandshake => "tls_handshake",
    NoAlpn => "no_alpn",
    H2Handshake => "h2_handshake",
    H2 => "h2",
    Io => "io",
    CodecCompressed => "codec_compressed",
    CodecTooLarge => "codec_too_large",
    CodecMalformed => "codec_malformed",
    CodecTruncated => "codec_truncated",
    ResourceExhausted => "resource_exhausted",
    BudgetStreamsPerConn => "budget_streams_per_conn",
    BudgetSetupPerConn => "budget_setup_per_conn",
    BudgetConnsPerIdentity => "budget_conns_per_identity",
    BudgetStreamsPerIdentity => "budget_streams_per_identity",
    BudgetShardBuffer => "budget_shard_buffer_bytes",
    Upstream => "upstream_status",
    Internal => "internal",
}

/// A failure that ends a dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// gRPC status code sent to the caller.
    pub code: Code,
    /// Who failed.
    pub side: Side,
    /// Whether failover may try another upstream.
    pub retry: Retry,
    /// Metric label.
    pub label: Label,
    /// Message for people (`grpc-message`).
    pub message: Cow<'static, str>,
    /// The far end's own trailers when it refused the dial: answered
    /// verbatim (every code, the message bytes, other metadata).
    pub trailers: Option<Box<HeaderMap>>,
}

impl Error {
    /// A new error.
    pub fn new(code: Code, side: Side, retry: Retry, label: Label, message: impl Into<Cow<'static, str>>) -> Error {
        Error { code, side, retry, label, message: message.into(), trailers: None }
    }

    /// A malformed request from the caller (INVALID_ARGUMENT, never retried).
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Code::InvalidArgument, Side::Client, Retry::Never, Label::BadRequest, message)
    }

    /// The caller cancelled or reset its stream.
    pub fn cancelled(message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Code::Cancelled, Side::Client, Retry::Never, Label::Cancelled, message)
    }

    /// A deadline passed while waiting on `side`.
    pub fn deadline(side: Side, message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Code::DeadlineExceeded, side, Retry::Unsafe, Label::DialTimeout, message)
    }

    /// `side` is down or unreachable; `retry` says whether the dial reached it.
    pub fn unavailable(side: Side, retry: Retry, label: Label, message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Code::Unavailable, side, retry, label, message)
    }

    /// An internal failure of this proxy.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Code::Internal, Side::Proxy, Retry::Never, Label::Internal, message)
    }

    /// The status a far end (`side`) ended the dial with, before it was
    /// established. NOT_FOUND and UNAVAILABLE are safe to retry elsewhere:
    /// the far end says it could not serve this dial at all.
    pub fn from_status(side: Side, s: Status) -> Error {
        let retry = match s.code {
            Code::NotFound | Code::Unavailable => Retry::Safe,
            Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::Cancelled => Retry::Never,
            _ => Retry::Unsafe,
        };
        Error { code: s.code, side, retry, label: Label::Upstream, message: s.message, trailers: None }
    }

    /// A far end's refusal read from its trailers (kept for verbatim
    /// forwarding); `None` when they carry no `grpc-status`.
    pub fn from_trailers(side: Side, t: HeaderMap) -> Option<Error> {
        let s = Status::from_headers(&t)?;
        let mut e = Error::from_status(side, s);
        // Labels that change what this hop does or reports keep the far
        // end's: no_route and not_loaded (failover and replanning) and
        // permission_denied (audit and metrics name the refusal, wherever it
        // was decided). Others stay `upstream_status`, counted as the far
        // end's answer.
        for l in [Label::NoRoute, Label::NotLoaded, Label::PermissionDenied] {
            if t.get(LABEL_HEADER).is_some_and(|v| v.as_bytes() == l.name().as_bytes()) {
                e.label = l;
            }
        }
        e.trailers = Some(Box::new(t));
        Some(e)
    }

    /// Whether the failure was in reaching a holder of the agent's tunnel
    /// (none there, link or tunnel gone, peer unreachable or frozen), not
    /// the agent's own answer: the routes may soon name another holder, so
    /// a dial may wait for them to change (an agent moving between proxies).
    pub fn is_route_failure(&self) -> bool {
        use Label::*;
        matches!(
            self.label,
            NoRoute
                | NotLoaded
                | NotHeldHere
                | Refused
                | GoAway
                | ConnectionLost
                | ShardStopped
                | TunnelGone
                | PeerUnreachable
                | PeerBackoff
                | Unresponsive
                | LinkSuspect
                | Connect
                | ConnectTimeout
                | TlsHandshake
                | NoAlpn
                | H2Handshake
                | NotEstablished
                | PipeBroken
        )
    }

    /// The same error with another retry class.
    pub fn with_retry(mut self, retry: Retry) -> Error {
        self.retry = retry;
        self
    }

    /// The same error, attributed to another side.
    pub fn on(mut self, side: Side) -> Error {
        self.side = side;
        self
    }

    /// Whether another upstream may be tried.
    pub fn is_retry_safe(&self) -> bool {
        self.retry == Retry::Safe
    }

    /// The gRPC status this error ends a call with.
    pub fn status(&self) -> Status {
        Status { code: self.code, message: self.message.clone() }
    }

    /// Trailers carrying this error's status.
    pub fn to_trailers(&self) -> HeaderMap {
        if let Some(t) = &self.trailers {
            return (**t).clone();
        }
        let mut m = HeaderMap::with_capacity(3);
        super::status::write_status(self.code, &self.message, &mut m);
        // The label tells a proxy upstream why (e.g. `no_route`: this holder
        // has no tunnel to the agent, so another may), which the code alone
        // does not: an agent's NOT_FOUND for an unknown service is final.
        m.insert(LABEL_HEADER, http::HeaderValue::from_static(self.label.name()));
        m
    }

    /// Maps an HTTP/2 stream error seen while talking to `side`.
    /// `established` tells whether the far end already acted on the dial.
    pub fn from_h2(side: Side, established: bool, e: &h2::Error) -> Error {
        let after = if established { Retry::Unsafe } else { Retry::Safe };
        match e.reason() {
            Some(h2::Reason::REFUSED_STREAM) => Error::unavailable(
                side,
                Retry::Safe,
                Label::Refused,
                format!("the {} refused the stream unprocessed", side.name()),
            ),
            Some(h2::Reason::CANCEL) if side == Side::Client => Error::cancelled("the client cancelled the dial"),
            Some(r) if e.is_go_away() => Error::unavailable(
                side,
                if r == h2::Reason::NO_ERROR && !established { Retry::Safe } else { after },
                Label::GoAway,
                format!("the {} is going away ({r:?})", side.name()),
            ),
            Some(r) if side == Side::Client => Error::new(
                Code::Cancelled,
                side,
                Retry::Never,
                Label::StreamReset,
                format!("the client reset the stream ({r:?})"),
            ),
            Some(r) => Error::unavailable(
                side,
                after,
                Label::StreamReset,
                format!("the {} reset the stream ({r:?})", side.name()),
            ),
            None if e.is_io() => Error::unavailable(
                side,
                after,
                Label::ConnectionLost,
                format!("connection to the {} lost: {e}", side.name()),
            ),
            None => Error::unavailable(side, after, Label::H2, format!("HTTP/2 error with the {}: {e}", side.name())),
        }
    }
}

impl From<super::codec::CodecError> for Error {
    fn from(e: super::codec::CodecError) -> Error {
        use super::codec::CodecError as C;
        let (code, label) = match e {
            C::Compressed => (Code::InvalidArgument, Label::CodecCompressed),
            C::TooLarge(..) => (Code::ResourceExhausted, Label::CodecTooLarge),
            C::Malformed => (Code::InvalidArgument, Label::CodecMalformed),
            C::Truncated => (Code::InvalidArgument, Label::CodecTruncated),
        };
        Error::new(code, Side::Client, Retry::Never, label, e.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::status::display(self.code, &self.message, f)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_index_densely_and_name_uniquely() {
        for (i, l) in Label::ALL.iter().enumerate() {
            assert_eq!(l.index(), i);
        }
        let mut names: Vec<_> = Label::ALL.iter().map(|l| l.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Label::COUNT);
    }

    #[test]
    fn refused_stream_is_retry_safe_and_a_client_cancel_is_cancelled() {
        let refused = Error::from_h2(Side::Peer, false, &h2::Error::from(h2::Reason::REFUSED_STREAM));
        assert!(refused.is_retry_safe());
        assert_eq!(refused.label, Label::Refused);
        let cancel = Error::from_h2(Side::Client, true, &h2::Error::from(h2::Reason::CANCEL));
        assert_eq!((cancel.code, cancel.side, cancel.retry), (Code::Cancelled, Side::Client, Retry::Never));
        let reset = Error::from_h2(Side::Agent, true, &h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!(reset.retry, Retry::Unsafe);
    }

    #[test]
    fn far_end_statuses_keep_their_code_and_retry_only_when_nothing_happened() {
        let nf = Error::from_status(Side::Peer, Status::new(Code::NotFound, "x"));
        assert!(nf.is_retry_safe());
        let denied = Error::from_status(Side::Peer, Status::new(Code::PermissionDenied, "x"));
        assert_eq!(denied.retry, Retry::Never);
        let dl = Error::from_status(Side::Agent, Status::new(Code::DataLoss, "x"));
        assert_eq!((dl.code, dl.retry), (Code::DataLoss, Retry::Unsafe));
    }
}
