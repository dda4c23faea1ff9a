//! gRPC status: codes, trailers, and the trailers-only error response.
//!
//! Invariant: every dial that ends, ends with a `grpc-status` (and a readable
//! `grpc-message` when it is not OK); the hot path builds statuses from static
//! strings and allocates only when a message carries a name.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderValue};

/// The gRPC status codes ringpeer produces or understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// The call was cancelled.
    Cancelled = 1,
    /// Unknown error.
    Unknown = 2,
    /// Malformed request.
    InvalidArgument = 3,
    /// Deadline exceeded.
    DeadlineExceeded = 4,
    /// No route to the agent or service.
    NotFound = 5,
    /// Identity not allowed.
    PermissionDenied = 7,
    /// A limit was exceeded.
    ResourceExhausted = 8,
    /// Method not served here.
    Unimplemented = 12,
    /// Internal error.
    Internal = 13,
    /// Tunnel, peer or target down.
    Unavailable = 14,
}

impl Code {
    /// Parses a numeric `grpc-status`.
    pub fn from_u32(v: u32) -> Code {
        match v {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    /// The canonical upper-case name, e.g. `NOT_FOUND`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
        }
    }

    fn header_value(self) -> HeaderValue {
        const V: [&str; 15] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14"];
        HeaderValue::from_static(V[self as usize])
    }
}

/// A gRPC status: code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: Code,
    /// The human-readable message (`grpc-message`).
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
        map.insert("grpc-status", self.code.header_value());
        if !self.message.is_empty() {
            // grpc-message is percent-encoded; we keep it to visible ASCII.
            let clean: String =
                self.message.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
            if let Ok(v) = HeaderValue::from_str(&percent_encode(&clean)) {
                map.insert("grpc-message", v);
            }
        }
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
        let message = map.get("grpc-message").and_then(|v| v.to_str().ok()).map(percent_decode).unwrap_or_default();
        Some(Status { code: Code::from_u32(code), message: message.into() })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str(self.code.name())
        } else {
            write!(f, "{}: {}", self.code.name(), self.message)
        }
    }
}

impl std::error::Error for Status {}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b == b'%' {
            out.push_str("%25");
        } else {
            out.push(b as char);
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
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
    fn status_round_trips_through_trailers() {
        let s = Status::new(Code::NotFound, "no route to agent \"x\" (100% sure)");
        let back = Status::from_headers(&s.to_trailers()).unwrap();
        assert_eq!(back, s);
        assert_eq!(Status::from_headers(&Status::ok().to_trailers()).unwrap(), Status::ok());
        assert!(Status::from_headers(&HeaderMap::new()).is_none());
    }
}
