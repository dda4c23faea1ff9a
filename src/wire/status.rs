//! gRPC status: the 17 codes, `grpc-status` / `grpc-message` trailers, and
//! the final status a caller reads.
//!
//! Invariants:
//! - Every code round-trips: a status read from trailers keeps its code
//!   (unknown numbers stay as [`Code::Unknown`] only when they are not one of
//!   the 17).
//! - `grpc-message` is percent-encoded as the gRPC spec says (bytes outside
//!   0x20..=0x7E and `%` become `%XX`), so non-ASCII text survives a hop.
//! - A relay never rebuilds a far end's trailers from a [`Status`]: it
//!   forwards the header map (see `relay`); this type is for ends of a call.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderValue};

macro_rules! codes {
    ($($v:ident = $n:literal => $s:literal,)*) => {
        /// The gRPC status codes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Code { $(#[doc = $s] $v = $n,)* }

        impl Code {
            /// Every code, in numeric order.
            pub const ALL: [Code; 17] = [$(Code::$v,)*];

            /// Parses a numeric `grpc-status`; numbers outside 0..=16 are UNKNOWN.
            pub fn from_u32(v: u32) -> Code {
                match v { $($n => Code::$v,)* _ => Code::Unknown }
            }

            /// The canonical upper-case name, e.g. `NOT_FOUND`.
            pub fn name(self) -> &'static str {
                match self { $(Code::$v => $s,)* }
            }
        }
    };
}

codes! {
    Ok = 0 => "OK",
    Cancelled = 1 => "CANCELLED",
    Unknown = 2 => "UNKNOWN",
    InvalidArgument = 3 => "INVALID_ARGUMENT",
    DeadlineExceeded = 4 => "DEADLINE_EXCEEDED",
    NotFound = 5 => "NOT_FOUND",
    AlreadyExists = 6 => "ALREADY_EXISTS",
    PermissionDenied = 7 => "PERMISSION_DENIED",
    ResourceExhausted = 8 => "RESOURCE_EXHAUSTED",
    FailedPrecondition = 9 => "FAILED_PRECONDITION",
    Aborted = 10 => "ABORTED",
    OutOfRange = 11 => "OUT_OF_RANGE",
    Unimplemented = 12 => "UNIMPLEMENTED",
    Internal = 13 => "INTERNAL",
    Unavailable = 14 => "UNAVAILABLE",
    DataLoss = 15 => "DATA_LOSS",
    Unauthenticated = 16 => "UNAUTHENTICATED",
}

impl Code {
    fn header_value(self) -> HeaderValue {
        const V: [&str; 17] =
            ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
        HeaderValue::from_static(V[self as usize])
    }
}

/// A gRPC status: code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: Code,
    /// The human-readable message (`grpc-message`, decoded).
    pub message: Cow<'static, str>,
}

impl Status {
    /// A status with a message.
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Status {
        Status { code, message: message.into() }
    }

    /// The OK status.
    pub const fn ok() -> Status {
        Status { code: Code::Ok, message: Cow::Borrowed("") }
    }

    /// Whether this is OK.
    pub fn is_ok(&self) -> bool {
        self.code == Code::Ok
    }

    /// Writes `grpc-status` / `grpc-message` into a header map.
    pub fn write_to(&self, map: &mut HeaderMap) {
        write_status(self.code, &self.message, map);
    }

    /// Trailers carrying this status.
    pub fn to_trailers(&self) -> HeaderMap {
        let mut m = HeaderMap::with_capacity(2);
        self.write_to(&mut m);
        m
    }

    /// Reads a status out of trailers (or trailers-only headers).
    /// `None` when the map carries no `grpc-status`.
    pub fn from_headers(map: &HeaderMap) -> Option<Status> {
        let code = map.get("grpc-status")?.to_str().ok()?.trim().parse::<u32>().ok()?;
        let message = map.get("grpc-message").map(|v| percent_decode(v.as_bytes())).unwrap_or_default();
        Some(Status { code: Code::from_u32(code), message: message.into() })
    }
}

/// Writes `grpc-status` and, when `message` is not empty, a percent-encoded
/// `grpc-message`.
pub fn write_status(code: Code, message: &str, map: &mut HeaderMap) {
    map.insert("grpc-status", code.header_value());
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            map.insert("grpc-message", v);
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        display(self.code, &self.message, f)
    }
}

/// `CODE: message` (or just `CODE`), as statuses and errors print.
pub fn display(code: Code, message: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    if message.is_empty() {
        f.write_str(code.name())
    } else {
        write!(f, "{}: {message}", code.name())
    }
}

impl std::error::Error for Status {}

/// gRPC's percent-encoding of `grpc-message`: UTF-8 bytes outside
/// 0x20..=0x7E, and `%` itself, become `%XX`.
fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

fn percent_decode(b: &[u8]) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_and_any_text_round_trips_through_trailers() {
        for code in Code::ALL {
            let s = Status::new(code, "no route to agent \"ümlaut-✓\" (100% sure)\n");
            let back = Status::from_headers(&s.to_trailers()).unwrap();
            assert_eq!(back, s);
        }
        assert_eq!(Status::from_headers(&Status::ok().to_trailers()).unwrap(), Status::ok());
        assert!(Status::from_headers(&HeaderMap::new()).is_none());
        assert_eq!(Code::from_u32(17), Code::Unknown);
    }
}
