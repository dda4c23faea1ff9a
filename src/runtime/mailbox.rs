//! Each shard's inbox: the explicit channel through which other threads (the
//! control thread, other shards) hand it work.
//!
//! Invariants: many producers, one consumer (the owning shard); lock-free
//! (crossbeam `SegQueue` plus an `AtomicWaker`); a message is handled on the
//! owning shard only.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use crossbeam::queue::SegQueue;
use futures_util::task::AtomicWaker;

struct Inner<T> {
    q: SegQueue<T>,
    waker: AtomicWaker,
    closed: AtomicBool,
}

/// A handle that can post to a shard; cheap to clone, `Send`.
pub struct Mailbox<T>(Arc<Inner<T>>);

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox(self.0.clone())
    }
}

/// The owning shard's receiving end.
pub struct Inbox<T>(Arc<Inner<T>>);

/// A mailbox and its inbox.
pub fn mailbox<T>() -> (Mailbox<T>, Inbox<T>) {
    let i = Arc::new(Inner { q: SegQueue::new(), waker: AtomicWaker::new(), closed: AtomicBool::new(false) });
    (Mailbox(i.clone()), Inbox(i))
}

impl<T> Mailbox<T> {
    /// Posts a message; returns it back when the shard has stopped.
    pub fn post(&self, msg: T) -> Result<(), T> {
        if self.0.closed.load(Ordering::Acquire) {
            return Err(msg);
        }
        self.0.q.push(msg);
        self.0.waker.wake();
        Ok(())
    }
}

impl<T> Inbox<T> {
    /// The next message.
    pub async fn recv(&mut self) -> T {
        poll_fn(|cx| {
            if let Some(m) = self.0.q.pop() {
                return Poll::Ready(m);
            }
            self.0.waker.register(cx.waker());
            match self.0.q.pop() {
                Some(m) => Poll::Ready(m),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}
