//! Each shard's inbox: the explicit channel through which other threads (the
//! control thread, other shards) hand it work.
//!
//! Two lanes, one consumer (the owning shard):
//! - a **bounded queue** of messages (`cap`): [`Mailbox::post`] answers
//!   [`Refused::Full`] past it, so a stalled shard costs its producers a
//!   refusal, never memory; [`Mailbox::post_always`] bypasses the bound for
//!   the few messages that must never be lost and are bounded by something
//!   else (one per tunnel change);
//! - a **latest-wins slot** ([`Mailbox::replace`]): a newer value replaces
//!   one not yet taken (route snapshots: only the newest matters), so that
//!   lane never holds more than one value whatever the rate.
//!
//! Invariants: lock-free (crossbeam `SegQueue`, an `AtomicPtr` swap, an
//! `AtomicWaker`); a message is handled on the owning shard only; posting
//! after the inbox is gone fails with [`Refused::Closed`].
//!
//! Alternatives rejected: `crossbeam::channel::bounded` (its full-queue
//! path would let a shard block, and it cannot replace a queued value);
//! a `Mutex<Option<T>>` for the slot (a lock a producer could hold while the
//! shard waits).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::Arc;
use std::task::Poll;

use crossbeam::queue::SegQueue;
use futures_util::task::AtomicWaker;

/// Why a post was refused; the message comes back.
#[derive(Debug)]
pub enum Refused<T> {
    /// The queue holds `cap` messages already.
    Full(T),
    /// The owning shard has stopped.
    Closed(T),
}

struct Inner<T, L> {
    q: SegQueue<T>,
    cap: usize,
    /// An `Arc<L>` turned into a raw pointer, or null. Each side swaps and
    /// owns what it swapped out, so no value is freed twice or leaked.
    latest: AtomicPtr<L>,
    waker: AtomicWaker,
    closed: AtomicBool,
}

impl<T, L> Drop for Inner<T, L> {
    fn drop(&mut self) {
        let p = *self.latest.get_mut();
        if !p.is_null() {
            // SAFETY: `p` came from `Arc::into_raw` and nobody else holds it.
            drop(unsafe { Arc::from_raw(p) });
        }
    }
}

/// A handle that can post to a shard; cheap to clone, `Send`.
pub struct Mailbox<T, L = ()>(Arc<Inner<T, L>>);

impl<T, L> Clone for Mailbox<T, L> {
    fn clone(&self) -> Self {
        Mailbox(self.0.clone())
    }
}

/// The owning shard's receiving end.
pub struct Inbox<T, L = ()>(Arc<Inner<T, L>>);

/// What an inbox yields.
pub enum Next<T, L> {
    /// The newest value of the latest-wins lane.
    Latest(Arc<L>),
    /// The next queued message.
    Msg(T),
}

/// A mailbox holding at most `cap` queued messages, and its inbox.
pub fn mailbox<T, L>(cap: usize) -> (Mailbox<T, L>, Inbox<T, L>) {
    let i = Arc::new(Inner {
        q: SegQueue::new(),
        cap,
        latest: AtomicPtr::new(std::ptr::null_mut()),
        waker: AtomicWaker::new(),
        closed: AtomicBool::new(false),
    });
    (Mailbox(i.clone()), Inbox(i))
}

impl<T, L> Mailbox<T, L> {
    /// Queues a message unless `cap` are queued already.
    pub fn post(&self, msg: T) -> Result<(), Refused<T>> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed(msg));
        }
        // Producers race between the check and the push, so the queue may
        // exceed `cap` by at most the number of concurrent producers.
        if self.0.q.len() >= self.0.cap {
            return Err(Refused::Full(msg));
        }
        self.0.q.push(msg);
        self.0.waker.wake();
        Ok(())
    }

    /// Queues a message whatever the queue length (for messages bounded by
    /// another budget, which must not be lost).
    pub fn post_always(&self, msg: T) -> Result<(), Refused<T>> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed(msg));
        }
        self.0.q.push(msg);
        self.0.waker.wake();
        Ok(())
    }

    /// Puts `v` in the latest-wins slot, dropping a value not yet taken.
    pub fn replace(&self, v: Arc<L>) -> Result<(), Arc<L>> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(v);
        }
        let old = self.0.latest.swap(Arc::into_raw(v).cast_mut(), Ordering::AcqRel);
        if !old.is_null() {
            // SAFETY: swapped out, so this side owns it (see `latest`).
            drop(unsafe { Arc::from_raw(old) });
        }
        self.0.waker.wake();
        Ok(())
    }

    /// The queue's bound.
    pub fn cap(&self) -> usize {
        self.0.cap
    }

    /// Messages queued now (the latest-wins slot not counted).
    pub fn len(&self) -> usize {
        self.0.q.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.0.q.is_empty()
    }

    /// Whether anything (a message or a latest value) waits to be taken.
    pub fn has_pending(&self) -> bool {
        !self.0.q.is_empty() || !self.0.latest.load(Ordering::Acquire).is_null()
    }
}

impl<T, L> Inbox<T, L> {
    fn take(&self) -> Option<Next<T, L>> {
        let p = self.0.latest.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            // SAFETY: swapped out, so this side owns it (see `latest`).
            return Some(Next::Latest(unsafe { Arc::from_raw(p) }));
        }
        self.0.q.pop().map(Next::Msg)
    }

    /// The next value: the latest-wins slot first, then the queue.
    pub async fn recv(&mut self) -> Next<T, L> {
        poll_fn(|cx| {
            if let Some(m) = self.take() {
                return Poll::Ready(m);
            }
            self.0.waker.register(cx.waker());
            match self.take() {
                Some(m) => Poll::Ready(m),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl<T, L> Drop for Inbox<T, L> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_refuses_past_its_cap_and_the_slot_keeps_only_the_newest() {
        let (tx, mut rx) = mailbox::<u32, String>(2);
        assert!(tx.post(1).is_ok() && tx.post(2).is_ok());
        assert!(matches!(tx.post(3), Err(Refused::Full(3))));
        assert!(tx.post_always(4).is_ok(), "exempt messages pass the bound");
        for v in ["old", "older", "newest"] {
            tx.replace(Arc::new(v.to_string())).unwrap();
        }
        let got: Vec<String> = futures_lite::future::block_on(async {
            let mut out = Vec::new();
            for _ in 0..4 {
                out.push(match rx.recv().await {
                    Next::Latest(s) => (*s).clone(),
                    Next::Msg(n) => n.to_string(),
                });
            }
            out
        });
        assert_eq!(got, ["newest", "1", "2", "4"]);
        drop(rx);
        assert!(matches!(tx.post(5), Err(Refused::Closed(5))));
        assert!(tx.replace(Arc::new("late".into())).is_err());
    }
}
