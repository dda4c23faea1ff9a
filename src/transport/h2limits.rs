//! Every HTTP/2 limit h2 0.4 exposes, set explicitly on both builders,
//! with the reason for each value (no h2 default is trusted: a default
//! may change with the crate, and several are wrong for a proxy whose peer
//! links carry thousands of streams).
//!
//! Invariants: servers and clients get the same per-stream and
//! per-connection bounds; values that come from configuration are
//! validated by [`H2Tuning::validate`] before they get here (h2 panics on
//! some out-of-range values).

use std::time::Duration;

use super::h2conf::{H2Tuning, MAX_RESETS_PER_SEC};

impl H2Tuning {
    /// A server builder with these settings. Every limit h2 0.4 exposes is
    /// set here (the constants below say why each value); only
    /// `enable_connect_protocol` is left off, as we serve no CONNECT.
    pub fn server(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            .header_table_size(HEADER_TABLE_SIZE)
            .max_send_buffer_size(self.max_send_buffer)
            .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
            .reset_stream_duration(RESET_STREAM_DURATION)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .data_frame_budget(self.data_frame_budget());
        b
    }

    /// A client builder with these settings (every limit h2 0.4 exposes;
    /// `initial_stream_id` stays at 1).
    pub fn client(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.max_header_list_size)
            .header_table_size(HEADER_TABLE_SIZE)
            .max_send_buffer_size(self.max_send_buffer)
            // Until the peer's SETTINGS arrive; a peer with a lower limit
            // refuses the excess unprocessed (retried by the caller).
            .initial_max_send_streams(100)
            // Streams the server may open towards us: none (push is off).
            .max_concurrent_streams(0)
            .enable_push(false)
            .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
            .reset_stream_duration(RESET_STREAM_DURATION)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .data_frame_budget(self.data_frame_budget());
        b
    }

    /// Bytes of small-DATA-frame bookkeeping a peer may make us hold (h2's
    /// own rule, made explicit): half the connection window, at least
    /// 25,600. A peer that splits its window into tiny frames past this
    /// gets GOAWAY ENHANCE_YOUR_CALM from h2.
    fn data_frame_budget(&self) -> usize {
        (self.connection_window as usize / 2).max(25_600)
    }
    /// [`H2Tuning::server`] for a link that carries many callers' dials
    /// (an agent's side of a tunnel, the serving side of a peer link).
    pub fn link_server(&self) -> h2::server::Builder {
        let mut b = self.server();
        b.max_local_error_reset_streams(None);
        b
    }

    /// [`H2Tuning::client`] for a link that carries many callers' dials
    /// (a proxy's side of a tunnel, the dialling side of a peer link).
    ///
    /// On links, h2's count of late frames for streams we reset is off: a
    /// link carries every caller's cancellations by the thousand (each dial
    /// a client resets or that passes its deadline), the far end's frames
    /// for them may arrive after h2 forgot the stream, and h2 (0.4.20)
    /// counts each for the connection's whole life, so mass cancellation
    /// would end the link with ENHANCE_YOUR_CALM (seen in tests/budgets.rs).
    /// The bound guards against hostile clients, not a trusted link.
    pub fn link_client(&self) -> h2::client::Builder {
        let mut b = self.client();
        b.max_local_error_reset_streams(None);
        b
    }
}

/// HPACK dynamic table we let the peer's encoder use (our decoder's memory
/// per connection). Our header sets are a few hundred bytes and repeat, so
/// the RFC's 4 KiB already holds them all; more only costs memory per
/// connection.
pub const HEADER_TABLE_SIZE: u32 = 4096;

/// Streams we reset (a cancelled dial resets its upstream stream) that h2
/// remembers for [`RESET_STREAM_DURATION`], so frames still in flight for
/// them are ignored. Past it the oldest is forgotten, and a late frame for
/// it is a connection error, which would take a peer link's other streams
/// with it: a peer link carries thousands of streams, and a client leaving
/// with its dials resets a burst of them at once. h2's default (50) is far
/// too small for that; 4096 entries of a few hundred bytes hold ~1 MiB at
/// worst, only for a second.
pub const MAX_CONCURRENT_RESET_STREAMS: usize = 4096;

/// How long a reset stream is remembered (about an RTT, per RFC 9113
/// 5.4.2; h2's default).
pub const RESET_STREAM_DURATION: Duration = Duration::from_secs(1);

/// Streams the peer reset before we accepted them, waiting in h2's accept
/// queue; past it h2 ends the connection with ENHANCE_YOUR_CALM. Our accept
/// loop takes a stream as soon as h2 has parsed it, so only a burst within
/// one read can queue: a client cancelling a burst of requests it just sent
/// reaches a few dozen. Equal to [`MAX_RESETS_PER_SEC`], our own bound on
/// accepted streams reset before establishment: rejected, the old 1024,
/// which let a flood park five times more dead streams in the queue than
/// our own rule allows in a second.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = MAX_RESETS_PER_SEC as usize;

/// Streams we had to reset because of the peer's protocol errors (bad
/// headers, window overruns), over the connection's life; past it h2 ends
/// the connection with ENHANCE_YOUR_CALM. A conforming peer causes few; an
/// abusive one makes us do work for each. h2 (0.4.20) never decrements the
/// count, so it is a lifetime budget: kept at h2's own 1024 so a long-lived
/// client (one `forward` connection for days) is not cut for rare races,
/// and turned off on tunnels and peer links, which carry every client's
/// cancellations. Rejected: 256 (cuts long-lived honest clients sooner for
/// no memory gained: the reset streams themselves are already bounded by
/// [`MAX_CONCURRENT_RESET_STREAMS`]).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
