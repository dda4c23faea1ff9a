//! A bounded single-producer single-consumer pipe between two shards
//! (threads): the half of a stream that crosses shards. Generic over the
//! item (the relay sends payload `Bytes`, an end, or a failure).
//!
//! Invariants: no locks and no allocation per message (a preallocated
//! crossbeam `ArrayQueue` and two `AtomicWaker`s); `Bytes` move, payload is
//! never copied; the queue bound gives backpressure; the consumer always
//! learns whether the producer ended cleanly (an end item) or vanished
//! (`recv` returns `None`).

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use crossbeam::queue::ArrayQueue;
use futures_util::task::AtomicWaker;

struct Shared<T> {
    q: ArrayQueue<T>,
    rx_waker: AtomicWaker,
    tx_waker: AtomicWaker,
    tx_gone: AtomicBool,
    rx_gone: AtomicBool,
}

/// The sending half.
pub struct PipeTx<T>(Arc<Shared<T>>);
/// The receiving half.
pub struct PipeRx<T>(Arc<Shared<T>>);

/// The receiver is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// A pipe holding at most `cap` items.
pub fn pipe<T>(cap: usize) -> (PipeTx<T>, PipeRx<T>) {
    let s = Arc::new(Shared {
        q: ArrayQueue::new(cap.max(1)),
        rx_waker: AtomicWaker::new(),
        tx_waker: AtomicWaker::new(),
        tx_gone: AtomicBool::new(false),
        rx_gone: AtomicBool::new(false),
    });
    (PipeTx(s.clone()), PipeRx(s))
}

impl<T> PipeTx<T> {
    /// Sends an item, waiting while the pipe is full.
    pub async fn send(&mut self, item: T) -> Result<(), Closed> {
        let mut item = Some(item);
        poll_fn(|cx| {
            let s = &*self.0;
            if s.rx_gone.load(Ordering::Acquire) {
                return Poll::Ready(Err(Closed));
            }
            match s.q.push(item.take().expect("polled after ready")) {
                Ok(()) => {
                    s.rx_waker.wake();
                    Poll::Ready(Ok(()))
                }
                Err(back) => {
                    s.tx_waker.register(cx.waker());
                    // Re-check after registering so a concurrent pop is not missed.
                    match s.q.push(back) {
                        Ok(()) => {
                            s.rx_waker.wake();
                            Poll::Ready(Ok(()))
                        }
                        Err(back) => {
                            item = Some(back);
                            if s.rx_gone.load(Ordering::Acquire) {
                                return Poll::Ready(Err(Closed));
                            }
                            Poll::Pending
                        }
                    }
                }
            }
        })
        .await
    }
}

impl<T> PipeTx<T> {
    /// Resolves once the receiver is gone (whoever was to read gave up).
    /// Not to be awaited while a [`send`](Self::send) waits: they share
    /// one waker slot.
    pub async fn closed(&self) {
        poll_fn(|cx| {
            let s = &*self.0;
            if s.rx_gone.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            s.tx_waker.register(cx.waker());
            if s.rx_gone.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

impl<T> Drop for PipeTx<T> {
    fn drop(&mut self) {
        self.0.tx_gone.store(true, Ordering::Release);
        self.0.rx_waker.wake();
    }
}

impl<T> PipeRx<T> {
    /// The next item; `None` when the sender is gone without an `End`.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let s = &*self.0;
            if let Some(it) = s.q.pop() {
                s.tx_waker.wake();
                return Poll::Ready(Some(it));
            }
            s.rx_waker.register(cx.waker());
            if let Some(it) = s.q.pop() {
                s.tx_waker.wake();
                return Poll::Ready(Some(it));
            }
            if s.tx_gone.load(Ordering::Acquire) {
                // The sender may have pushed right before leaving.
                return Poll::Ready(s.q.pop());
            }
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for PipeRx<T> {
    fn drop(&mut self) {
        self.0.rx_gone.store(true, Ordering::Release);
        self.0.tx_waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[derive(Debug)]
    enum Item {
        Data(Bytes),
        End(Option<u8>),
    }

    #[test]
    fn bytes_cross_threads_in_order_with_backpressure() {
        let (mut tx, mut rx) = pipe(4);
        let src = Bytes::from(vec![5u8; 1 << 16]);
        let ptr = src.as_ptr() as usize;
        let producer = std::thread::spawn(move || {
            futures_lite::future::block_on(async {
                for i in 0..1000u32 {
                    tx.send(Item::Data(Bytes::copy_from_slice(&i.to_be_bytes()))).await.unwrap();
                }
                tx.send(Item::Data(src)).await.unwrap();
                tx.send(Item::End(None)).await.unwrap();
            })
        });
        futures_lite::future::block_on(async {
            for i in 0..1000u32 {
                let Some(Item::Data(b)) = rx.recv().await else { panic!() };
                assert_eq!(b[..], i.to_be_bytes());
            }
            let Some(Item::Data(b)) = rx.recv().await else { panic!() };
            assert_eq!(b.as_ptr() as usize, ptr, "Bytes moved, not copied");
            assert!(matches!(rx.recv().await, Some(Item::End(None))));
            assert!(rx.recv().await.is_none());
        });
        producer.join().unwrap();
    }

    #[test]
    fn receiver_gone_is_reported() {
        let (mut tx, rx) = pipe(1);
        drop(rx);
        assert!(futures_lite::future::block_on(tx.send(Item::End(None))).is_err());
    }
}
