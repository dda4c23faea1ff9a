//! Load for the upgrade stories: dials through the library's reconnecting
//! `Dialer`, one per entry proxy, and long streams checked end to end
//! (SHA-256 of what was sent against what came back).

use crate::common;
use crate::echo_of;

use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ringpeer::client::{DialIo, Dialer};
use ringpeer::transport::h2conf::H2Tuning;
use ringpeer::wire::DialTarget;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------- clients

/// A client of one entry proxy: the library's [`Dialer`], which keeps one
/// connection, replaces it when the proxy sent GOAWAY, and sends a dial the
/// proxy refused unprocessed (GOAWAY) once more on the new connection.
pub(crate) struct Entry {
    pub(crate) addr: SocketAddr,
    pub(crate) dialer: Dialer,
}

impl Entry {
    pub(crate) fn new(addr: SocketAddr, dir: &Path) -> Entry {
        let tls = ringpeer::client::client_tls(dir, "client").unwrap();
        Entry { addr, dialer: Dialer::new(&addr.to_string(), tls, H2Tuning::default()) }
    }

    /// One dial: open, write `payload`, read its echo, close; within 12 s
    /// (the dial deadline is 10 s).
    pub(crate) async fn dial(&self, target: &DialTarget, payload: &[u8]) -> Result<(), String> {
        let dial = async {
            let mut d = DialIo::from(self.dialer.dial(target, Duration::from_secs(10)).await?);
            d.write(payload).await?;
            let mut back = Vec::with_capacity(payload.len());
            d.read_exact(&mut back, payload.len()).await?;
            d.close_write()?;
            while let Some(b) = d.read().await? {
                back.extend_from_slice(&b);
            }
            Ok::<_, ringpeer::wire::error::Error>((back, d.status().await))
        };
        match ringpeer::runtime::timeout(Duration::from_secs(12), dial).await {
            Ok(Ok((_, s))) if !s.is_ok() => Err(format!("status {s}")),
            Ok(Ok((b, _))) if b == payload => Ok(()),
            Ok(Ok((b, _))) => Err(format!("the echo returned {} bytes, not the {} sent", b.len(), payload.len())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 12 s".into()),
        }
    }
}

/// What a dialer saw.
#[derive(Default, Debug)]
pub(crate) struct Dials {
    pub(crate) made: usize,
    /// (time since the dialer started, entry, target, error).
    pub(crate) failed: Vec<(Duration, SocketAddr, String, String)>,
    pub(crate) slowest: Duration,
    /// (time since the dialer started, target, time taken) of each
    /// successful dial's end.
    pub(crate) oks: Vec<(Duration, String, Duration)>,
}

impl Dials {
    /// The longest time between two successful dials to `target`.
    pub(crate) fn longest_gap(&self, target: &str) -> Duration {
        let at: Vec<Duration> = self.oks.iter().filter(|(_, t, _)| t == target).map(|(at, _, _)| *at).collect();
        at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    /// The slowest successful dial to `target`.
    pub(crate) fn slowest_to(&self, target: &str) -> Duration {
        self.oks.iter().filter(|(_, t, _)| t == target).map(|(_, _, took)| *took).max().unwrap_or_default()
    }

    pub(crate) fn report(&self, what: &str) {
        eprintln!("{what}: {} dials, {} failed, slowest {:?}", self.made, self.failed.len(), self.slowest);
        for f in self.failed.iter().take(10) {
            eprintln!("  failed at {:?} via {} to {}: {}", f.0, f.1, f.2, f.3);
        }
    }
}

/// A thread dialling every agent of `agents` through every entry proxy of
/// `entries`, one round every `every`, until `stop` is set or `window` has
/// passed. It sends on `ready` once 20 rounds succeeded in a row.
pub(crate) fn spawn_dialer(
    dir: &Path,
    entries: Vec<SocketAddr>,
    agents: Vec<String>,
    every: Duration,
    window: Option<Duration>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<()>,
) -> std::thread::JoinHandle<Dials> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        ringpeer::runtime::block_on("dialer", move || async move {
            let entries: Vec<Entry> = entries.iter().map(|a| Entry::new(*a, &dir)).collect();
            let targets: Vec<DialTarget> = agents.iter().map(|a| echo_of(a)).collect();
            let mut out = Dials::default();
            let t0 = Instant::now();
            let (mut clean_rounds, mut ready) = (0, Some(ready));
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) && window.is_none_or(|w| t0.elapsed() < w) {
                let next = t0 + every * (round as u32 + 1);
                round += 1;
                let failed_before = out.failed.len();
                for e in &entries {
                    for t in &targets {
                        let payload = common::random_bytes(512);
                        let at = t0.elapsed();
                        let r = e.dial(t, &payload).await;
                        out.made += 1;
                        out.slowest = out.slowest.max(t0.elapsed() - at);
                        match r {
                            Ok(()) => out.oks.push((t0.elapsed(), t.to_string(), t0.elapsed() - at)),
                            Err(err) => out.failed.push((at, e.addr, t.to_string(), err)),
                        }
                    }
                }
                clean_rounds = if out.failed.len() == failed_before { clean_rounds + 1 } else { 0 };
                if clean_rounds >= 20 {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                let now = Instant::now();
                if next > now {
                    glommio::timer::sleep(next - now).await;
                }
            }
            out
        })
        .unwrap()
    })
}

/// What a long stream carried.
#[derive(Debug)]
pub(crate) struct StreamOut {
    #[allow(dead_code)] // read through Debug, in the report of a cut stream
    pub(crate) entry: SocketAddr,
    pub(crate) agent: String,
    pub(crate) sent: u64,
    pub(crate) echoed: u64,
    /// SHA-256 of all sent bytes equals that of all echoed bytes.
    pub(crate) intact: bool,
    /// The call ended with status OK.
    pub(crate) ok: bool,
    /// The call's end: its status, or the error that cut it.
    pub(crate) end: String,
}

/// One stream to `agent`'s echo service through `e`: a chunk of `chunk`
/// random bytes every `every` until `stop`, then a half-close; reads the
/// echo to its end. `progress` counts it once its first chunk came back,
/// and once it ended.
async fn long_stream(
    e: Rc<Entry>,
    entry: SocketAddr,
    agent: String,
    chunk: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> StreamOut {
    let mut out = StreamOut { entry, agent, sent: 0, echoed: 0, intact: false, ok: false, end: String::new() };
    let o = match e.dialer.dial(&echo_of(&out.agent), Duration::from_secs(10)).await {
        Ok(o) => o,
        Err(e) => {
            out.end = format!("dial: {e}");
            return out;
        }
    };
    let (mut send, mut recv) = (o.send, o.recv);
    let writer = glommio::spawn_local(async move {
        let (mut h, mut n, mut err) = (Sha256::new(), 0u64, None);
        while !stop.load(Ordering::Relaxed) {
            let b = common::random_bytes(chunk);
            if let Err(e) = send.send(ringpeer::wire::codec::encode_data(&b)).await {
                err = Some(format!("send: {e}"));
                break;
            }
            h.update(&b);
            n += b.len() as u64;
            glommio::timer::sleep(every).await;
        }
        if err.is_none() {
            err = send.close().err().map(|e| format!("close: {e}"));
        }
        (n, <[u8; 32]>::from(h.finalize()), err)
    });
    let mut h = Sha256::new();
    let read_err = loop {
        match recv.next_data().await {
            Ok(Some(b)) => {
                if out.echoed == 0 {
                    progress.live.fetch_add(1, Ordering::Relaxed);
                }
                h.update(&b);
                out.echoed += b.len() as u64;
            }
            Ok(None) => break None,
            Err(e) => break Some(format!("read: {e}")),
        }
    };
    let (sent, sent_hash, write_err) = writer.await;
    out.sent = sent;
    out.intact = sent_hash == <[u8; 32]>::from(h.finalize()) && sent == out.echoed;
    out.end = match (write_err, read_err) {
        (Some(e), _) | (None, Some(e)) => e,
        (None, None) => match recv.trailers().await {
            Ok(t) => match t.as_ref().and_then(ringpeer::wire::status::Status::from_headers) {
                Some(s) => {
                    out.ok = s.is_ok();
                    s.to_string()
                }
                None => "no status in the trailers".into(),
            },
            Err(e) => format!("trailers: {e}"),
        },
    };
    out
}

/// A thread running one long stream per `(entry, agent)` of `plan`, each on
/// its entry's shared client connection, until `stop`.
pub(crate) fn spawn_streams(
    dir: &Path,
    plan: Vec<(SocketAddr, String)>,
    chunk: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> std::thread::JoinHandle<Vec<StreamOut>> {
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        ringpeer::runtime::block_on("streams", move || async move {
            let mut conns: Vec<Rc<Entry>> = Vec::new();
            let mut tasks = Vec::new();
            for (entry, agent) in plan {
                if !conns.iter().any(|e| e.addr == entry) {
                    conns.push(Rc::new(Entry::new(entry, &dir)));
                }
                let e = conns.iter().find(|e| e.addr == entry).unwrap().clone();
                let (stop, progress) = (stop.clone(), progress.clone());
                tasks.push(glommio::spawn_local(async move {
                    let out = long_stream(e, entry, agent, chunk, every, stop, progress.clone()).await;
                    progress.ended.fetch_add(1, Ordering::Relaxed);
                    out
                }));
            }
            let mut outs = Vec::new();
            for t in tasks {
                outs.push(t.await);
            }
            outs
        })
        .unwrap()
    })
}

/// How far the long streams of a [`spawn_streams`] thread got.
#[derive(Default)]
pub(crate) struct Progress {
    /// Streams whose first chunk came back.
    pub(crate) live: AtomicUsize,
    /// Streams that ended.
    pub(crate) ended: AtomicUsize,
}

/// Waits until all `n` streams of `h` echo; if one ends first, stops them
/// all and fails with their report.
pub(crate) fn streams_up(
    h: std::thread::JoinHandle<Vec<StreamOut>>,
    progress: &Progress,
    n: usize,
    stop: &AtomicBool,
) -> std::thread::JoinHandle<Vec<StreamOut>> {
    let t0 = Instant::now();
    while progress.live.load(Ordering::Relaxed) < n {
        if progress.ended.load(Ordering::Relaxed) > 0 || t0.elapsed() > Duration::from_secs(20) {
            stop.store(true, Ordering::Relaxed);
            let outs = h.join().unwrap();
            assert_streams_intact(&outs, 0);
            panic!("{} of {n} streams echoed within 20 s", progress.live.load(Ordering::Relaxed));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    h
}

/// Asserts every stream of `outs` ended OK with its bytes intact; prints
/// the figures.
pub(crate) fn assert_streams_intact(outs: &[StreamOut], min_bytes: u64) {
    let bytes: Vec<u64> = outs.iter().map(|o| o.echoed).collect();
    let cut: Vec<&StreamOut> = outs.iter().filter(|o| !o.intact || !o.ok || o.sent < min_bytes).collect();
    eprintln!(
        "{} long streams, {} cut or damaged; bytes echoed per stream {}..{} (total {})",
        outs.len(),
        cut.len(),
        bytes.iter().min().unwrap_or(&0),
        bytes.iter().max().unwrap_or(&0),
        bytes.iter().sum::<u64>()
    );
    for o in cut.iter().take(10) {
        eprintln!("  cut: {o:?}");
    }
    assert!(cut.is_empty(), "{} of {} streams cut or damaged, first: {:?}", cut.len(), outs.len(), cut[0]);
}
