//! Certificate reload: a process's TLS material (certificate, key, CA
//! bundle, CRL) is replaced while it runs, on request (SIGHUP, [`Trigger`])
//! and when the files change (polled every [`POLL`] from a plain thread).
//!
//! Invariants:
//! - The rustls configs built from the material live in a [`Live`] cell
//!   that handshakes read once each (per accepted connection, per outgoing
//!   connect): new handshakes use the new material, established
//!   connections and their streams keep theirs. Rejected: a lock around
//!   the configs (a mutex on every accept, shared by every shard); a
//!   per-shard generation counter with a copy per shard (one more message
//!   kind to every shard for nothing: `ArcSwap::load` is a few atomic
//!   operations, no lock, no allocation).
//! - A change is loaded once its files read the same on two polls in a
//!   row, so a certificate and key written one after the other are not
//!   paired half-way; SIGHUP loads at once.
//! - A new material that does not load (unreadable, mismatched key, not
//!   signed by the bundle, revoked by the CRL, wrong identity) is refused
//!   with one warning and the old one keeps serving; the same bad files
//!   are not retried until they change again (or SIGHUP).
//! - A certificate with less than [`EXPIRY_WARNING`] of validity left is
//!   warned about at each load and once a day while running.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::tls::{TlsError, TlsFiles, TlsMaterial};
use super::verify::rfc3339;
use crate::runtime::Shutdown;

/// How often the files are read for changes.
pub const POLL: Duration = Duration::from_secs(1);
/// Validity left under which a certificate is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);
/// How often the expiry warning repeats while running.
const EXPIRY_RECHECK: Duration = Duration::from_secs(86_400);

/// Material and the configs built from it.
pub struct Loaded<T> {
    /// The material (identity, certificates for the metric).
    pub material: TlsMaterial,
    /// What the role built from it (acceptors, client configs).
    pub built: T,
    /// 0 for the first load, +1 per reload (caches keyed by it rebuild).
    pub generation: u64,
}

/// The current [`Loaded`], swapped whole by a reload.
pub struct Live<T>(Arc<ArcSwap<Loaded<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    /// A cell holding `material` and what was built from it.
    pub fn new(material: TlsMaterial, built: T) -> Live<T> {
        Live(Arc::new(ArcSwap::from_pointee(Loaded { material, built, generation: 0 })))
    }

    /// The current material; take what is needed and drop the guard (do
    /// not hold it across an await).
    pub fn current(&self) -> arc_swap::Guard<Arc<Loaded<T>>> {
        self.0.load()
    }

    fn replace(&self, material: TlsMaterial, built: T) -> Arc<Loaded<T>> {
        let generation = self.0.load().generation + 1;
        self.0.swap(Arc::new(Loaded { material, built, generation }))
    }
}

/// A material that may be replaced, seen without what a role built from
/// it: peer links build their own client configs (one per peer name) and
/// rebuild them when the generation moves.
pub trait MaterialSource {
    /// Generation of the current material.
    fn generation(&self) -> u64;
    /// The current material.
    fn material(&self) -> TlsMaterial;
}

impl<T> MaterialSource for Live<T> {
    fn generation(&self) -> u64 {
        self.0.load().generation
    }
    fn material(&self) -> TlsMaterial {
        self.0.load().material.clone()
    }
}

/// A material that never changes (tests, embedded uses).
impl MaterialSource for TlsMaterial {
    fn generation(&self) -> u64 {
        0
    }
    fn material(&self) -> TlsMaterial {
        self.clone()
    }
}

/// Asks a reloader to reload now (SIGHUP). Requests made while one is
/// pending coalesce.
#[derive(Clone)]
pub struct Trigger {
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Default for Trigger {
    fn default() -> Trigger {
        let (tx, rx) = bounded(1);
        Trigger { tx, rx }
    }
}

impl Trigger {
    /// Requests a reload.
    pub fn request(&self) {
        let _ = self.tx.try_send(());
    }

    /// Waits up to `t` for a request: `Some(true)` when one came,
    /// `Some(false)` on timeout (a trigger holds its own sender, so it
    /// never disconnects).
    pub fn wait(&self, t: Duration) -> Option<bool> {
        match self.rx.recv_timeout(t) {
            Ok(()) => Some(true),
            Err(RecvTimeoutError::Timeout) => Some(false),
            Err(RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// Logs what a load brought, and warns about certificates expiring soon.
pub fn log_loaded(who: &str, m: &TlsMaterial, what: &str) {
    let own = m.own();
    tracing::info!(
        "{who}: TLS {what}: certificate {} serial {} valid until {}, {} CA(s) in the bundle, {} CRL entries",
        own.subject,
        own.serial,
        rfc3339(own.not_after),
        m.cas().len(),
        m.crl_entries
    );
    warn_expiring(who, m);
}

/// Warns about each certificate of `m` with less than [`EXPIRY_WARNING`] left.
pub fn warn_expiring(who: &str, m: &TlsMaterial) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for c in &m.certs {
        let left = c.remaining(now);
        if left < EXPIRY_WARNING.as_secs() as i64 {
            let when = if left <= 0 { "expired" } else { "expires" };
            tracing::warn!(
                "{who}: {} certificate {} (serial {}) {when} at {} ({:.1} days left); issue a new one",
                c.kind,
                c.subject,
                c.serial,
                rfc3339(c.not_after),
                left as f64 / 86_400.0
            );
        }
    }
}

/// How to load and build a role's material.
pub struct Source<T> {
    /// Who, for the logs (e.g. `proxy proxy-a`).
    pub who: String,
    /// The files to watch.
    pub files: TlsFiles,
    /// Loads and checks the material (identity as at start-up).
    pub load: Box<dyn Fn() -> Result<TlsMaterial, TlsError> + Send>,
    /// Builds the role's configs.
    pub build: Build<T>,
}

/// How a role builds its configs from a material.
pub type Build<T> = Box<dyn Fn(&TlsMaterial) -> Result<T, TlsError> + Send>;

/// A hash of the watched files' contents (a missing file counts as such).
fn fingerprint(f: &TlsFiles) -> u64 {
    let mut h = DefaultHasher::new();
    for p in [Some(&f.ca), Some(&f.cert), Some(&f.key), f.crl.as_ref()].into_iter().flatten() {
        std::fs::read(p).ok().hash(&mut h);
    }
    h.finish()
}

/// What differs between two loads, for the log.
fn changes(old: &TlsMaterial, new: &TlsMaterial) -> String {
    let mut c = Vec::new();
    if old.own() != new.own() {
        c.push(format!("certificate (serial {} -> {})", old.own().serial, new.own().serial));
    }
    if old.cas() != new.cas() {
        c.push(format!("CA bundle ({} -> {} CAs)", old.cas().len(), new.cas().len()));
    }
    if old.crl_entries != new.crl_entries {
        c.push(format!("CRL ({} -> {} entries)", old.crl_entries, new.crl_entries));
    }
    if c.is_empty() {
        "reloaded (no change)".into()
    } else {
        format!("reloaded: {}", c.join(", "))
    }
}

fn reload<T>(src: &Source<T>, live: &Live<T>) -> Result<String, TlsError> {
    let m = (src.load)()?;
    let built = (src.build)(&m)?;
    let what = changes(&live.current().material, &m);
    live.replace(m.clone(), built);
    log_loaded(&src.who, &m, &what);
    Ok(what)
}

/// Starts the reload thread for `live`; it ends within [`POLL`] of `stop`.
pub fn spawn<T: Send + Sync + 'static>(
    src: Source<T>,
    live: Live<T>,
    trigger: Trigger,
    stop: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    // The files as they are now, taken before the thread starts: a change
    // made right after `spawn` returns is then always seen as one.
    let mut seen = fingerprint(&src.files);
    std::thread::Builder::new().name("tls-reload".into()).spawn(move || {
        // The whole trigger, not just its receiver (a closure captures only
        // the fields it uses): its sender keeps the channel open when no
        // one else holds one.
        let trigger = trigger;
        let mut pending = None;
        let mut checked = Instant::now();
        loop {
            let asked = match trigger.rx.recv_timeout(POLL) {
                Ok(()) => true,
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if stop.is_triggered() {
                return;
            }
            let now = fingerprint(&src.files);
            let due = asked || (now != seen && pending == Some(now));
            pending = (now != seen).then_some(now);
            if due {
                pending = None;
                seen = now;
                if let Err(e) = reload(&src, &live) {
                    tracing::warn!("{}: TLS reload refused, the loaded certificates stay in use: {e}", src.who);
                }
            }
            if checked.elapsed() >= EXPIRY_RECHECK {
                checked = Instant::now();
                warn_expiring(&src.who, &live.current().material);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::certs;
    use crate::transport::identity::Role;

    fn wait_gen<T>(live: &Live<T>, g: u64) {
        let t0 = Instant::now();
        while live.current().generation < g {
            assert!(t0.elapsed() < Duration::from_secs(10), "generation {} after 10 s", live.current().generation);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_changed_file_is_loaded_a_bad_one_refused_and_a_request_reloads_at_once() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path(), "c1").unwrap();
        let files = TlsFiles::in_dir(dir.path(), "proxy-a");
        let load = {
            let f = files.clone();
            move || TlsMaterial::load_as(&f, "c1", Role::Proxy, "proxy-a")
        };
        let m = load().unwrap();
        let live = Live::new(m.clone(), m.own().serial.clone());
        let src = Source {
            who: "test".into(),
            files: files.clone(),
            load: Box::new(load),
            build: Box::new(|m: &TlsMaterial| Ok(m.own().serial.clone())),
        };
        let (trigger, stop) = (Trigger::default(), Shutdown::new());
        let t = spawn(src, live.clone(), trigger.clone(), stop.clone()).unwrap();
        // A new certificate: loaded by the poller within a few polls.
        let (c, _) = certs::issue(dir.path(), Role::Proxy, "proxy-a").unwrap();
        let new = crate::transport::tls::CertInfo::of(
            "own",
            &rustls::pki_types::pem::PemObject::from_pem_file(&c)
                .map(|d: rustls::pki_types::CertificateDer| d)
                .unwrap(),
        )
        .unwrap();
        wait_gen(&live, 1);
        assert_eq!(live.current().built, new.serial);
        // A key that does not match: refused, the loaded one stays.
        std::fs::copy(dir.path().join("client-key.pem"), &files.key).unwrap();
        std::thread::sleep(POLL * 3);
        assert_eq!(live.current().generation, 1);
        assert!(!t.is_finished());
        // A request reloads at once, even with nothing changed.
        certs::issue(dir.path(), Role::Proxy, "proxy-a").unwrap();
        trigger.request();
        wait_gen(&live, 2);
        stop.trigger();
        let t0 = Instant::now();
        t.join().unwrap();
        assert!(t0.elapsed() <= POLL * 2, "the thread took {:?} to stop", t0.elapsed());
    }

    #[test]
    fn a_reloader_nobody_can_ask_still_polls() {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path(), "c1").unwrap();
        let files = TlsFiles::in_dir(dir.path(), "proxy-a");
        let f = files.clone();
        let m = TlsMaterial::load(&f, "c1", Role::Proxy).unwrap();
        let src = Source {
            who: "test".into(),
            files,
            load: Box::new(move || TlsMaterial::load(&f, "c1", Role::Proxy)),
            build: Box::new(|_: &TlsMaterial| Ok(())),
        };
        let stop = Shutdown::new();
        let t = spawn(src, Live::new(m, ()), Trigger::default(), stop.clone()).unwrap();
        std::thread::sleep(POLL * 2 + POLL / 2);
        assert!(!t.is_finished(), "the poller ended on its own");
        stop.trigger();
        t.join().unwrap();
    }
}
