//! The `[h2]` settings: windows, frame and header sizes, stream counts,
//! keepalive and idle timers, with their defaults and validation.
//!
//! Invariants: every value a running connection uses passed
//! [`H2Tuning::validate`], whose errors name the key (h2 panics on some
//! out-of-range values, and 0 in several keys would silently stop a proxy).
//! The builders that apply these values are in [`super::h2limits`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// HTTP/2 settings (the `[h2]` config section). Defaults were chosen by
/// measurement (see README, "Tuning").
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct H2Tuning {
    /// Initial per-stream receive window, bytes.
    pub stream_window: u32,
    /// Connection receive window, bytes.
    pub connection_window: u32,
    /// Largest DATA frame we accept, bytes (16 KiB .. 16 MiB).
    pub max_frame_size: u32,
    /// Concurrent streams a peer may open on one connection.
    pub max_concurrent_streams: u32,
    /// Largest header list accepted, bytes.
    pub max_header_list_size: u32,
    /// Data buffered per stream before backpressure, bytes.
    pub max_send_buffer: usize,
    /// TLS + HTTP/2 handshake deadline, ms.
    pub handshake_timeout_ms: u64,
    /// Keepalive ping interval (from one answer to the next ping), ms.
    pub keepalive_interval_ms: u64,
    /// A ping unanswered this long marks the link suspect: new dials skip
    /// it (it stays open, and the answer clears the mark), ms.
    pub keepalive_miss_ms: u64,
    /// A ping unanswered this long ends the connection, ms.
    pub keepalive_timeout_ms: u64,
    /// A server connection with no open stream for this long is closed, ms (0: never).
    pub idle_timeout_ms: u64,
    /// After GOAWAY, how long a server connection keeps its open streams, ms.
    /// Not a `[h2]` key: a proxy sets it from its `drain_timeout_ms`, an
    /// agent from its own.
    #[serde(skip)]
    pub drain_timeout_ms: u64,
}

impl Default for H2Tuning {
    fn default() -> Self {
        H2Tuning {
            stream_window: 4 << 20,
            connection_window: 32 << 20,
            max_frame_size: 64 << 10,
            max_concurrent_streams: 100_000,
            max_header_list_size: 32 << 10,
            max_send_buffer: 1 << 20,
            handshake_timeout_ms: 10_000,
            // A frozen peer is suspect within interval + miss (3 s) and
            // gone within interval + timeout (8 s); one 17-byte PING per
            // connection every 2 s costs next to nothing (see README).
            keepalive_interval_ms: 2_000,
            keepalive_miss_ms: 1_000,
            keepalive_timeout_ms: 6_000,
            idle_timeout_ms: 300_000,
            drain_timeout_ms: 5_000,
        }
    }
}

impl H2Tuning {
    /// The h2 crate's own defaults for windows, frame size and send buffer
    /// (64 KiB windows, 16 KiB frames), for comparison runs.
    pub fn h2_crate_defaults() -> H2Tuning {
        H2Tuning {
            stream_window: 65_535,
            connection_window: 65_535,
            max_frame_size: 16_384,
            max_send_buffer: 400 << 10,
            ..H2Tuning::default()
        }
    }

    /// Checks the values against the HTTP/2 limits and each other; an
    /// error names the key (`h2.<key>`).
    pub fn validate(&self) -> Result<(), String> {
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err(format!("h2.max_frame_size {} is outside 16384..=16777215", self.max_frame_size));
        }
        for (k, v) in [("stream_window", self.stream_window), ("connection_window", self.connection_window)] {
            if !(65_535..=i32::MAX as u32).contains(&v) {
                return Err(format!("h2.{k} {v} is outside 65535..=2147483647"));
            }
        }
        // Zero would refuse every stream, every header block, every send,
        // or fire at once: none of them is a way to disable a feature.
        let positive = [
            ("max_concurrent_streams", u64::from(self.max_concurrent_streams)),
            ("max_header_list_size", u64::from(self.max_header_list_size)),
            ("max_send_buffer", self.max_send_buffer as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_miss_ms", self.keepalive_miss_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
        ];
        if let Some((k, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("h2.{k} must be > 0"));
        }
        if self.max_send_buffer > u32::MAX as usize {
            return Err(format!("h2.max_send_buffer {} is above 4294967295", self.max_send_buffer));
        }
        if self.keepalive_miss_ms >= self.keepalive_timeout_ms {
            return Err(format!(
                "h2.keepalive_miss_ms ({}) must be below h2.keepalive_timeout_ms ({}): a link is suspect before it is given up",
                self.keepalive_miss_ms, self.keepalive_timeout_ms
            ));
        }
        if self.idle_timeout_ms != 0 && self.idle_timeout_ms < 100 {
            return Err(format!("h2.idle_timeout_ms {} must be 0 (never) or >= 100", self.idle_timeout_ms));
        }
        Ok(())
    }

    /// Handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}
