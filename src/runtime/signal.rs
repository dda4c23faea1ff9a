//! Shard-local signals: a one-shot event ([`Signal`]) and an in-flight
//! counter that can be awaited to reach zero ([`Inflight`]).
//!
//! Invariants: both are `!Send` and live on one shard, so waiting and firing
//! take no lock and no atomic (a `Cell` and a `RefCell` that is never held
//! across an await). Each waiter holds one waker clone at most (glommio
//! counts waker references in an `i16`). The process-wide
//! [`Shutdown`](super::Shutdown) is waited on once per shard, which then
//! fires its local signal; connections only ever wait on the local one.
//!
//! Alternative rejected: every connection waiting on the process-wide
//! signal. That is one shared mutex locked by every accept and connection
//! on every shard.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Waiters {
    slots: RefCell<Vec<Option<Waker>>>,
}

impl Waiters {
    fn register(&self, slot: &mut Option<usize>, cx: &Context<'_>) {
        let mut ws = self.slots.borrow_mut();
        match *slot {
            Some(i) => match &mut ws[i] {
                Some(w) if w.will_wake(cx.waker()) => {}
                s => *s = Some(cx.waker().clone()),
            },
            None => {
                let i = ws.iter().position(Option::is_none).unwrap_or_else(|| {
                    ws.push(None);
                    ws.len() - 1
                });
                ws[i] = Some(cx.waker().clone());
                *slot = Some(i);
            }
        }
    }

    fn leave(&self, slot: Option<usize>) {
        if let Some(i) = slot {
            if let Some(s) = self.slots.borrow_mut().get_mut(i) {
                *s = None;
            }
        }
    }

    fn wake_all(&self) {
        let ws: Vec<Waker> = self.slots.borrow_mut().iter_mut().filter_map(Option::take).collect();
        for w in ws {
            w.wake();
        }
    }
}

#[derive(Default)]
struct SignalInner {
    fired: Cell<bool>,
    waiters: Waiters,
}

/// A one-shot event on one shard.
#[derive(Clone, Default)]
pub struct Signal(Rc<SignalInner>);

impl Signal {
    /// An unfired signal.
    pub fn new() -> Signal {
        Signal::default()
    }

    /// Fires the signal and wakes every waiter.
    pub fn trigger(&self) {
        if !self.0.fired.replace(true) {
            self.0.waiters.wake_all();
        }
    }

    /// Whether it fired.
    pub fn is_triggered(&self) -> bool {
        self.0.fired.get()
    }

    /// Resolves once the signal fires.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait { s: self, slot: None }
    }
}

/// The future of [`Signal::wait`].
pub struct SignalWait<'a> {
    s: &'a Signal,
    slot: Option<usize>,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.s.is_triggered() {
            return Poll::Ready(());
        }
        let mut slot = self.slot;
        self.s.0.waiters.register(&mut slot, cx);
        self.slot = slot;
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        self.s.0.waiters.leave(self.slot);
    }
}

#[derive(Default)]
struct InflightInner {
    n: Cell<usize>,
    waiters: Waiters,
}

/// Counts open work (streams) on one shard; [`idle`](Self::idle) waits for
/// zero.
#[derive(Clone, Default)]
pub struct Inflight(Rc<InflightInner>);

/// Held while one unit of work is open.
pub struct InflightGuard(Rc<InflightInner>);

impl Inflight {
    /// Marks one unit open until the guard drops.
    pub fn enter(&self) -> InflightGuard {
        self.0.n.set(self.0.n.get() + 1);
        InflightGuard(self.0.clone())
    }

    /// Units open now.
    pub fn get(&self) -> usize {
        self.0.n.get()
    }

    /// Resolves when no unit is open.
    pub async fn idle(&self) {
        let mut slot = None;
        std::future::poll_fn(|cx| {
            if self.0.n.get() == 0 {
                self.0.waiters.leave(slot.take());
                return Poll::Ready(());
            }
            self.0.waiters.register(&mut slot, cx);
            Poll::Pending
        })
        .await
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let n = self.0.n.get() - 1;
        self.0.n.set(n);
        if n == 0 {
            self.0.waiters.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_wake_on_trigger_and_on_idle() {
        futures_lite::future::block_on(async {
            let s = Signal::new();
            let s2 = s.clone();
            let w = futures_lite::future::or(
                async {
                    s.wait().await;
                    true
                },
                async {
                    futures_lite::future::yield_now().await;
                    s2.trigger();
                    futures_lite::future::pending::<bool>().await
                },
            );
            assert!(w.await);
            assert!(s.is_triggered());
            let f = Inflight::default();
            let g = f.enter();
            let f2 = f.clone();
            futures_lite::future::zip(f2.idle(), async move {
                futures_lite::future::yield_now().await;
                drop(g);
            })
            .await;
            assert_eq!(f.get(), 0);
        });
    }
}
