//! A link's state, the stream slots it hands out, the single-flight
//! connect that callers wait on.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::SendStream;

use crate::transport::keepalive::LinkHealth;
use crate::wire::error::{Error, Retry, Side};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Ready,
    Draining,
    Closed,
}

/// One connection to a peer (Connecting is the address's [`Flight`]).
pub(super) struct Link {
    pub(super) proxy: Rc<str>,
    pub(super) state: Cell<State>,
    /// Our handle; `None` once Draining, so the connection can close when
    /// the streams it carries end.
    pub(super) send: RefCell<Option<SendRequest<Bytes>>>,
    /// Slots handed out and not yet dropped.
    pub(super) active: Cell<usize>,
    /// The keepalive verdict: a suspect link gets no new stream unless the
    /// caller has nowhere else to go.
    pub(super) health: LinkHealth,
}

impl Link {
    pub(super) fn drain(&self, why: &'static str) {
        if self.state.get() == State::Ready {
            self.state.set(State::Draining);
            self.send.borrow_mut().take();
            tracing::debug!(peer = &*self.proxy, why, active = self.active.get(), "peer link draining");
        }
    }

    /// Whether the link is Ready. A GOAWAY is noticed here: h2 records it as
    /// the connection error that `poll_ready` on a handle without a pending
    /// stream reports at once (so a no-op waker is enough).
    pub(super) fn is_ready(&self) -> bool {
        if self.state.get() != State::Ready {
            return false;
        }
        let failed = match self.send.borrow_mut().as_mut() {
            Some(s) => match s.poll_ready(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(Err(e)) => Some(if e.is_go_away() { "goaway" } else { "connection_error" }),
                _ => None,
            },
            None => Some("no_handle"),
        };
        match failed {
            Some(why) => {
                self.drain(why);
                false
            }
            None => true,
        }
    }

    /// A slot on this link, if it is Ready for `proxy`, below the peer's
    /// limit, and (unless `suspect_ok`) answering its keepalive.
    pub(super) fn admit(self: &Rc<Self>, proxy: &str, suspect_ok: bool) -> Option<PeerStream> {
        if &*self.proxy != proxy || !self.is_ready() || (!suspect_ok && self.health.is_suspect()) {
            return None;
        }
        let send = self.send.borrow().as_ref()?.clone();
        if self.active.get() >= send.current_max_send_streams() {
            return None;
        }
        self.active.set(self.active.get() + 1);
        Some(PeerStream { send, slot: Slot(self.clone()) })
    }
}

/// A stream slot on a Ready peer link. Hold it for as long as the HTTP/2
/// stream opened on it lives: dropping it frees the slot.
pub struct PeerStream {
    /// A handle on the link's connection; open one stream with it
    /// (preferably through [`PeerStream::send_request`]).
    pub send: SendRequest<Bytes>,
    slot: Slot,
}

struct Slot(Rc<Link>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get().saturating_sub(1));
    }
}

impl PeerStream {
    /// Opens the stream. A failure here means no stream reached the peer,
    /// so it is retry-safe. A GOAWAY (or a lost connection) that arrived
    /// after the slot was handed out drains the link, so the retry lands on
    /// another link.
    pub fn send_request(
        &mut self,
        req: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), Error> {
        self.send.send_request(req, end_of_stream).map_err(|e| {
            if e.is_go_away() || e.is_io() {
                self.slot.0.drain(if e.is_go_away() { "goaway" } else { "connection_error" });
            }
            Error::from_h2(Side::Peer, false, &e).with_retry(Retry::Safe)
        })
    }
}

/// One connect in progress, shared by every caller waiting for the address.
#[derive(Default)]
pub(super) struct Flight {
    done: RefCell<Option<Result<(), Error>>>,
    waiters: RefCell<Vec<Waker>>,
}

impl Flight {
    pub(super) fn finish(&self, r: Result<(), Error>) {
        *self.done.borrow_mut() = Some(r);
        for w in self.waiters.take() {
            w.wake();
        }
    }

    pub(super) async fn wait(&self) -> Result<(), Error> {
        poll_fn(|cx| {
            if let Some(r) = &*self.done.borrow() {
                return Poll::Ready(r.clone());
            }
            let mut ws = self.waiters.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}
