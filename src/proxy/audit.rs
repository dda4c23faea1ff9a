//! The entry proxy's audit log: one JSON line per client-edge dial (who,
//! from where, to which agent and service, which way it went, how it ended,
//! how long it took and how many bytes it moved each way).
//!
//! Invariants:
//! - One line per client-edge dial, refused or served: a shard starts a
//!   [`Trail`] when the dial arrives, fills it in as the dial goes, and the
//!   trail queues its [`Record`] when it is dropped, whatever the exit
//!   (an exit that recorded no outcome is audited as CANCELLED).
//! - A shard never blocks and never makes a syscall for the audit: it
//!   pushes a boxed record into one bounded lock-free queue shared by the
//!   proxy's shards; a full queue drops the line and counts it
//!   (`ringpeer_audit_dropped_total`). Formatting (JSON, the time) happens
//!   on the writer thread, never in a shard.
//! - One plain writer thread drains the queue, batches lines and writes
//!   each batch with one `write_all` when the queue is empty (or the batch
//!   is full); it stops after the shards, writing what is queued, and the
//!   proxy waits for it at most [`STOP_WAIT`] (a sink that blocks, a full
//!   stdout pipe, cannot hold the process).
//! - Lines written + lines dropped = client-edge dials audited, exactly.
//!
//! Alternatives rejected: logging through `tracing` (a formatter in the
//! shard, and audit lines interleaved with logs); a bounded
//! `crossbeam::channel` with `try_send` (a send to a parked receiver is a
//! futex wake, a syscall in the shard for each dial of a quiet proxy: the
//! writer polls the queue instead, every [`POLL`] when idle); one queue per
//! shard (no contention, but the writer would poll every shard's queue,
//! and a dial rate at which one shared queue contends is far beyond what a
//! shard sets up); records inline in the queue (a 65 536-slot queue of
//! 232-byte records preallocates 15 MiB; boxed, 1 MiB).

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam::queue::ArrayQueue;
use http::HeaderValue;
use serde::Serialize;

use super::stats::AuditCounters;
use crate::config::AuditConfig;
use crate::relay::Tally;
use crate::runtime::Shutdown;
use crate::wire::error::{Error, Label};
use crate::wire::status::Code;

/// How long the idle writer waits before looking at the queue again.
pub const POLL: Duration = Duration::from_millis(20);
/// Bytes of lines gathered before a write, even if more are queued.
pub const BATCH_BYTES: usize = 64 << 10;
/// How long a stopping proxy waits for the writer to write what is queued.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// Which way a dial went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// It never got to try an upstream (refused, or no route).
    None,
    /// A tunnel on the entry shard.
    Local,
    /// A tunnel on another shard of this proxy.
    Shard(u32),
    /// A peer proxy (its id).
    Peer(String),
}

/// One audited dial, as a shard records it (plain values; the writer
/// formats them).
#[derive(Debug)]
pub struct Record {
    /// When the dial arrived.
    pub at: SystemTime,
    /// The entry shard.
    pub shard: u32,
    /// The client's SPIFFE URI (the connection's header value, shared).
    pub client: HeaderValue,
    /// The client's address, `ip:port`.
    pub source: String,
    /// The agent asked for ("" when the request was not decoded).
    pub agent: String,
    /// The service, as resolved ("" when unknown).
    pub service: String,
    /// The way it went: the upstream that served it, or for a dial that
    /// failed after an upstream was tried, the last one tried.
    pub path: Path,
    /// How it ended.
    pub code: Code,
    /// The error's label (`None` on OK).
    pub label: Option<Label>,
    /// The error's message ("" on OK).
    pub message: Cow<'static, str>,
    /// Arrival → established, or → refused.
    pub setup: Duration,
    /// Payload bytes client → agent.
    pub bytes_up: u64,
    /// Payload bytes agent → client.
    pub bytes_down: u64,
    /// Arrival → end.
    pub duration: Duration,
}

/// The JSON form of a [`Record`]: field names are the log's contract.
#[derive(Serialize)]
struct Line<'a> {
    time: &'a str,
    proxy: &'a str,
    shard: u32,
    client: &'a str,
    source: &'a str,
    agent: &'a str,
    service: &'a str,
    path: &'static str,
    via: &'a str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    setup_ms: f64,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: f64,
}

/// RFC 3339, UTC, milliseconds.
const TIME: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

fn ms(d: Duration) -> f64 {
    // Microsecond resolution is plenty and keeps the numbers short.
    (d.as_micros() as f64) / 1000.0
}

impl Record {
    /// Appends this record as one JSON line (with its newline) to `out`;
    /// `proxy` is this proxy's id.
    pub fn write_json(&self, proxy: &str, out: &mut Vec<u8>) {
        let time = time::OffsetDateTime::from(self.at).format(TIME).unwrap_or_default();
        let (path, via) = match &self.path {
            Path::None => ("none", ""),
            Path::Local => ("local", proxy),
            Path::Shard(_) => ("shard", proxy),
            Path::Peer(p) => ("peer", p.as_str()),
        };
        let line = Line {
            time: &time,
            proxy,
            shard: self.shard,
            client: self.client.to_str().unwrap_or("?"),
            source: &self.source,
            agent: &self.agent,
            service: &self.service,
            path,
            via,
            code: self.code.name(),
            label: self.label.map(Label::name),
            message: (self.code != Code::Ok).then_some(&*self.message),
            setup_ms: ms(self.setup),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: ms(self.duration),
        };
        // Serializing plain strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }
}

/// A shard's handle on its proxy's audit queue.
#[derive(Clone)]
pub struct Audit {
    queue: Arc<ArrayQueue<Box<Record>>>,
    counters: Arc<AuditCounters>,
}

impl Audit {
    /// Queues a record, or drops and counts it when the queue is full.
    pub fn push(&self, r: Box<Record>) {
        if self.queue.push(r).is_err() {
            self.counters.dropped(1);
        }
    }
}

/// The audit trail of one dial in progress: filled in as the dial goes,
/// queued when dropped (see the module invariants).
pub struct Trail<'a> {
    audit: &'a Audit,
    t0: Instant,
    established: bool,
    /// Always `Some` until dropped (taken there, to queue it unmoved).
    r: Option<Box<Record>>,
}

impl<'a> Trail<'a> {
    /// A dial from `client` at `source` just arrived on `shard`.
    pub fn start(audit: &'a Audit, shard: u32, client: HeaderValue, source: &str) -> Trail<'a> {
        let r = Box::new(Record {
            at: SystemTime::now(),
            shard,
            client,
            source: source.to_string(),
            agent: String::new(),
            service: String::new(),
            path: Path::None,
            code: Code::Cancelled,
            label: Some(Label::Cancelled),
            message: Cow::Borrowed("the dial ended before it had an outcome (its connection or shard closed)"),
            setup: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        });
        Trail { audit, t0: Instant::now(), established: false, r: Some(r) }
    }

    /// The dial names `agent` and (resolved) `service`.
    pub fn target(&mut self, agent: &str, service: &str) {
        if let Some(r) = &mut self.r {
            r.agent = agent.to_string();
            r.service = service.to_string();
        }
    }

    /// The dial was established through `path`.
    pub fn established(&mut self, path: Path) {
        self.path(path);
        if let Some(r) = &mut self.r {
            r.setup = self.t0.elapsed();
        }
        self.established = true;
    }

    /// The dial went (or last tried to go) through `path`.
    pub fn path(&mut self, path: Path) {
        if let Some(r) = &mut self.r {
            r.path = path;
        }
    }

    /// The dial failed with `e` (before or after establishment).
    pub fn failed(&mut self, e: &Error) {
        self.end(e.code, Some(e.label), e.message.clone());
    }

    /// The relay ended with `r`, having moved `up` and `down`: a relay that
    /// ended cleanly ends with the status the upstream's trailers carried
    /// (no trailers: what the relay answered then, UNKNOWN).
    pub fn relayed(&mut self, r: &Result<(), Error>, up: &Tally, down: &Tally) {
        if let Some(rec) = &mut self.r {
            rec.bytes_up = up.bytes.get();
            rec.bytes_down = down.bytes.get();
        }
        match (r, down.status.borrow_mut().take()) {
            (Err(e), _) => self.failed(e),
            (Ok(()), Some(s)) if s.is_ok() => self.end(Code::Ok, None, Cow::Borrowed("")),
            (Ok(()), Some(s)) => self.end(s.code, Some(Label::Upstream), s.message),
            (Ok(()), None) => self.end(
                Code::Unknown,
                Some(Label::Upstream),
                Cow::Borrowed("the upstream ended the call without a status"),
            ),
        }
    }

    fn end(&mut self, code: Code, label: Option<Label>, message: Cow<'static, str>) {
        if let Some(r) = &mut self.r {
            (r.code, r.label, r.message) = (code, label, message);
        }
    }
}

impl Drop for Trail<'_> {
    fn drop(&mut self) {
        let Some(mut r) = self.r.take() else { return };
        let now = self.t0.elapsed();
        if !self.established {
            r.setup = now;
        }
        r.duration = now;
        self.audit.push(r);
    }
}

/// The writer thread of a proxy's audit log.
pub struct Writer {
    thread: JoinHandle<()>,
    done: std::sync::mpsc::Receiver<()>,
}

/// Opens the sink `cfg` names and starts the writer thread, which runs until
/// `stop` fires (then writes what is queued and ends). `None` when the
/// audit is off.
pub fn start(
    cfg: &AuditConfig,
    proxy: &str,
    counters: Arc<AuditCounters>,
    stop: Shutdown,
) -> std::io::Result<Option<(Audit, Writer)>> {
    if !cfg.enabled {
        return Ok(None);
    }
    let sink: Box<dyn Write + Send> = if cfg.path == "-" {
        Box::new(std::io::stdout())
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        Box::new(std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(&cfg.path)?)
    };
    let audit = Audit { queue: Arc::new(ArrayQueue::new(cfg.queue)), counters };
    let (tx, done) = std::sync::mpsc::channel();
    let (a, proxy) = (audit.clone(), proxy.to_string());
    let thread = std::thread::Builder::new().name(format!("{proxy}-audit")).spawn(move || {
        write_loop(&a, &proxy, sink, &stop);
        let _ = tx.send(());
    })?;
    Ok(Some((audit, Writer { thread, done })))
}

impl Writer {
    /// Waits up to `wait` for the writer to finish (after its stop signal
    /// fired); whether it did. A writer stuck on its sink is left behind.
    pub fn finish(self, wait: Duration) -> bool {
        if self.done.recv_timeout(wait).is_err() {
            tracing::warn!(?wait, "the audit writer did not finish in time; lines still queued are lost");
            return false;
        }
        let _ = self.thread.join();
        true
    }
}

fn write_loop(a: &Audit, proxy: &str, mut sink: Box<dyn Write + Send>, stop: &Shutdown) {
    let mut batch = Vec::with_capacity(BATCH_BYTES + 1024);
    let mut failing = false;
    loop {
        // Read the signal before draining: whatever was queued before it
        // fired is written before the thread ends.
        let stopping = stop.is_triggered();
        let mut lines = 0u64;
        while batch.len() < BATCH_BYTES {
            let Some(r) = a.queue.pop() else { break };
            r.write_json(proxy, &mut batch);
            lines += 1;
        }
        if lines > 0 {
            match sink.write_all(&batch).and_then(|()| sink.flush()) {
                Ok(()) => {
                    a.counters.wrote(lines);
                    failing = false;
                }
                Err(e) => {
                    a.counters.dropped(lines);
                    if !failing {
                        tracing::warn!(error = %e, "cannot write the audit log; its lines are dropped (and counted)");
                    }
                    failing = true;
                }
            }
            batch.clear();
            continue;
        }
        if stopping {
            return;
        }
        stop.wait_blocking_for(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            shard: 1,
            client: HeaderValue::from_static("spiffe://demo/client/alice"),
            source: "127.0.0.1:5000".into(),
            agent: "agent-1".into(),
            service: "echo".into(),
            path: Path::Peer("proxy-b".into()),
            code: Code::Ok,
            label: None,
            message: Cow::Borrowed(""),
            setup: Duration::from_micros(2_500),
            bytes_up: 10,
            bytes_down: 20,
            duration: Duration::from_millis(30),
        }
    }

    fn json(r: &Record) -> serde_json::Map<String, serde_json::Value> {
        let mut out = Vec::new();
        r.write_json("proxy-a", &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        assert_eq!(out.last(), Some(&b'\n'));
        assert!(out.starts_with(b"{\"time\":\""), "fields in their documented order");
        serde_json::from_slice::<serde_json::Value>(&out).unwrap().as_object().unwrap().clone()
    }

    #[test]
    fn an_ok_dial_is_one_line_with_stable_names_and_types() {
        let o = json(&record());
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        let mut want = [
            "time",
            "proxy",
            "shard",
            "client",
            "source",
            "agent",
            "service",
            "path",
            "via",
            "code",
            "setup_ms",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ];
        want.sort();
        let mut got = keys.clone();
        got.sort();
        assert_eq!(got, want, "an OK line has no label and no message");
        assert_eq!(o["time"], "2026-11-18T11:06:40.123Z");
        assert_eq!(o["proxy"], "proxy-a");
        assert_eq!(o["shard"], 1);
        assert_eq!(o["client"], "spiffe://demo/client/alice");
        assert_eq!(o["source"], "127.0.0.1:5000");
        assert_eq!((o["agent"].as_str(), o["service"].as_str()), (Some("agent-1"), Some("echo")));
        assert_eq!((o["path"].as_str(), o["via"].as_str()), (Some("peer"), Some("proxy-b")));
        assert_eq!(o["code"], "OK");
        assert_eq!(o["setup_ms"].as_f64(), Some(2.5));
        assert_eq!((o["bytes_up"].as_u64(), o["bytes_down"].as_u64()), (Some(10), Some(20)));
        assert_eq!(o["duration_ms"].as_f64(), Some(30.0));
    }

    #[test]
    fn a_queue_slot_is_a_pointer_not_a_record() {
        // The module header's arithmetic: records inline would cost
        // `size_of::<Record>()` per preallocated slot.
        let (inline, boxed) = (std::mem::size_of::<Record>(), std::mem::size_of::<Box<Record>>());
        eprintln!("Record: {inline} bytes inline, {boxed} boxed");
        assert!(inline >= 200 && boxed == 8, "{inline} {boxed}");
    }

    #[test]
    fn a_refused_dial_names_code_label_and_message() {
        let mut r = record();
        r.path = Path::None;
        r.code = Code::PermissionDenied;
        r.label = Some(Label::PermissionDenied);
        r.message = Cow::Owned("permission denied: \"quoted\"\nand a newline".into());
        r.service = String::new();
        let o = json(&r);
        assert_eq!((o["path"].as_str(), o["via"].as_str()), (Some("none"), Some("")));
        assert_eq!(o["code"], "PERMISSION_DENIED");
        assert_eq!(o["label"], "permission_denied");
        assert_eq!(o["message"], "permission denied: \"quoted\"\nand a newline");
        assert_eq!(o["service"], "");
        // Local and sibling-shard dials name this proxy as the one that served.
        r.path = Path::Shard(0);
        assert_eq!((json(&r)["path"].clone(), json(&r)["via"].clone()), ("shard".into(), "proxy-a".into()));
        r.path = Path::Local;
        assert_eq!(json(&r)["via"], "proxy-a");
    }
}
