//! The backend event reader: a blocking thread that loads the whole route
//! state, then follows the event stream from its cursor (XREAD BLOCK),
//! resyncing fully when its position was trimmed away and periodically.
//!
//! Invariants: nothing is missed across reconnects (every (re)connect starts
//! with a full load whose cursor predates the scan); outages are reported to
//! the control thread once per connection attempt series, which logs once
//! per state change; reconnects back off, capped and jittered. When the
//! backend's master changes (its generation moves: Sentinel or Cluster
//! failover), the reader drops its connection, reconnects and resyncs, since
//! a failover can lose entries the old master never replicated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;

use crate::route::model::{BadValue, Event};
use crate::route::store::{Loaded, Read, StoreFactory, StreamId};
use crate::runtime::backoff::Backoff;

/// How long one XREAD blocks (bounds how fast the thread notices `stop`).
pub const BLOCK: Duration = Duration::from_millis(250);

/// How often the reader asks the backend whether its master moved
/// ([`StoreFactory::watch`]).
pub const WATCH: Duration = Duration::from_secs(1);

/// Messages to the control thread.
pub enum FromReader {
    /// A full load.
    Loaded(Loaded),
    /// Events after the previous message.
    Events(Vec<(StreamId, Result<Event, BadValue>)>),
    /// The backend is unreachable.
    Down(String),
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// Runs until `stop`.
pub fn run(store: Arc<dyn StoreFactory>, tx: Sender<FromReader>, resync: Duration, stop: Arc<AtomicBool>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut down_reported = false;
    'connect: while !stop.load(Ordering::Acquire) {
        // Read before connecting: a master change seen by anyone after this
        // point makes this connection suspect.
        let generation = store.generation();
        let mut s = match store.connect() {
            Ok(s) => s,
            Err(e) => {
                if !down_reported && tx.send(FromReader::Down(format!("{e:#}"))).is_err() {
                    return;
                }
                down_reported = true;
                sleep_unless_stopped(backoff.next_delay(), &stop);
                continue;
            }
        };
        loop {
            let loaded = match s.load() {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(FromReader::Down(format!("{e:#}")));
                    down_reported = true;
                    sleep_unless_stopped(backoff.next_delay(), &stop);
                    continue 'connect;
                }
            };
            let mut cursor = loaded.cursor;
            if tx.send(FromReader::Loaded(loaded)).is_err() {
                return;
            }
            backoff.reset();
            let loaded_at = Instant::now();
            let mut watched = loaded_at;
            loop {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                if loaded_at.elapsed() >= resync {
                    break;
                }
                if watched.elapsed() >= WATCH {
                    store.watch();
                    watched = Instant::now();
                }
                if store.generation() != generation {
                    continue 'connect;
                }
                match s.read(cursor, BLOCK) {
                    Ok(Read::Events(evs)) => {
                        cursor = evs.last().map(|(id, _)| *id).unwrap_or(cursor);
                        if tx.send(FromReader::Events(evs)).is_err() {
                            return;
                        }
                    }
                    Ok(Read::Timeout) => {}
                    Ok(Read::Trimmed) => {
                        tracing::info!(cursor = %cursor, "route events were trimmed past our position; full resync");
                        break;
                    }
                    Err(e) => {
                        let _ = tx.send(FromReader::Down(format!("{e:#}")));
                        down_reported = true;
                        sleep_unless_stopped(backoff.next_delay(), &stop);
                        continue 'connect;
                    }
                }
            }
        }
    }
}
