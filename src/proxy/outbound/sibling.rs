//! The sibling-shard upstream: a client that landed on shard A dials an
//! agent whose tunnel is on shard B. A keeps the client stream, B opens the
//! agent stream, and two pipes move the `Bytes` between them.
//!
//! Invariants: bytes cross shards by move, never by copy; the first item B
//! sends down is either establishment bytes (success) or a `Fail` with the
//! error, so A's pipeline decides exactly once; a failure on either side
//! travels through the pipe as `Fail` (or the pipe breaks), so a cancel on
//! one shard cancels the other's hop too.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future::or;

use super::{Opened, UpRecv, UpSend, Via};
use crate::proxy::shard::{CrossDial, Shard, ShardMailbox, ShardMsg};
use crate::relay::call::{self, Outgoing};
use crate::relay::{relay, Item, Leg, Sink, Tally};
use crate::runtime::mailbox::Refused;
use crate::runtime::pipe::pipe;
use crate::runtime::stats::Counter;
use crate::runtime::timeout;
use crate::wire::error::{Error, Label, Retry, Side};
use crate::wire::paths;
use crate::wire::status::Code;

/// Items buffered per direction between two shards (each at most one DATA
/// frame, so a cross-shard stream buffers at most this many frames: 1 MiB
/// at 64 KiB frames, as much as an h2 stream's send buffer). These bytes
/// are not metered (their credit was returned when they entered the pipe).
/// Rejected: 64, i.e. 4 MiB per stalled cross-shard stream; hidden while a
/// few stalled streams blocked the whole tunnel, it let the proxy grow by
/// 350 to 500 MiB with 200 stalled streams once the tunnel's window grew
/// with its streams (tests/budgets.rs).
pub const PIPE_CAP: usize = 16;

/// Queues a dial in shard `owner`'s mailbox, or says why it cannot:
/// past its bound ([`crate::proxy::shard::MAILBOX_DIALS`]) of queued dials, RESOURCE_EXHAUSTED naming the
/// budget (retry-safe: the dial never reached the owner, a peer may serve
/// it); a stopped shard, UNAVAILABLE.
pub fn post_dial(mailbox: &ShardMailbox, owner: u32, msg: ShardMsg) -> Result<(), Error> {
    match mailbox.post(msg) {
        Ok(()) => Ok(()),
        Err(Refused::Closed(_)) => {
            Err(Error::unavailable(Side::Proxy, Retry::Safe, Label::ShardStopped, format!("shard {owner} has stopped")))
        }
        Err(Refused::Full(_)) => {
            let m = format!(
                "budget shard_mailbox ({}) reached: shard {owner} has that many cross-shard dials queued",
                mailbox.cap()
            );
            Err(Error::new(Code::ResourceExhausted, Side::Proxy, Retry::Safe, Label::ResourceExhausted, m))
        }
    }
}

/// Shard A: hands the dial to shard `owner` and waits for its answer.
pub async fn open(shard: &Rc<Shard>, owner: u32, agent: &str, dial: Outgoing, left: Duration) -> Result<Opened, Error> {
    let (up_tx, up_rx) = pipe(PIPE_CAP);
    let (down_tx, mut down_rx) = pipe(PIPE_CAP);
    let msg = ShardMsg::Dial(Box::new(CrossDial { agent: agent.to_string(), dial, up: up_rx, down: down_tx }));
    let stopped =
        || Error::unavailable(Side::Proxy, Retry::Safe, Label::ShardStopped, format!("shard {owner} has stopped"));
    post_dial(shard.mailboxes.get(owner as usize).ok_or_else(stopped)?, owner, msg)?;
    // The owner runs the same deadline; the margin lets its answer arrive.
    match timeout(left + Duration::from_millis(200), down_rx.recv()).await {
        Ok(Some(Item::Data(b))) => Ok(Opened {
            send: UpSend::Pipe(up_tx),
            recv: UpRecv::Pipe(down_rx),
            held: vec![b],
            slot: None,
            tunnel_slot: None,
            via: Via::Sibling(owner),
        }),
        Ok(Some(Item::Fail(e))) => Err(e),
        Ok(_) => Err(stopped()),
        Err(_) => Err(Error::deadline(Side::Proxy, format!("shard {owner} did not answer the dial in time"))),
    }
}

/// Shard B: opens the agent stream for a dial that entered elsewhere and
/// relays it between the agent and the pipes.
pub async fn serve(shard: Rc<Shard>, d: CrossDial) {
    let CrossDial { agent, dial, mut up, mut down } = d;
    let Some(t) = shard.local_tunnel(&agent) else {
        let m = format!("the tunnel to agent {agent:?} just went away");
        down.fail(&Error::unavailable(Side::Proxy, Retry::Safe, Label::TunnelGone, m)).await;
        return;
    };
    let mut send = t.send.clone();
    let _on_tunnel = t.streams.enter();
    let uri = paths::uri(paths::AGENT_DIAL);
    // The entry shard gives up (its caller reset, its deadline passed) by
    // dropping its pipe ends: the opening is dropped with it, which resets
    // the agent stream, so the agent stops connecting the target.
    let open = call::open(&mut send, uri, dial.hop(0), dial.first.clone(), Side::Agent, shard.dial_timeout());
    let e = match or(async { Some(open.await) }, async {
        down.closed().await;
        None
    })
    .await
    {
        Some(Ok(e)) => e,
        Some(Err(e)) => return down.fail(&e).await,
        None => {
            tracing::debug!(shard = shard.index, agent, "the entry shard gave up on the dial; cancelled it");
            return;
        }
    };
    let _open = shard.streams.enter();
    let (mut agent_tx, mut agent_rx) = (e.send, e.recv);
    agent_rx.meter(&shard.buf);
    for b in e.held {
        if Sink::send(&mut down, b).await.is_err() {
            return;
        }
    }
    // The entry shard counts the payload; counting it here too would count
    // a cross-shard dial twice.
    let (uncounted, untallied) = (Counter::default(), Tally::default());
    let r = relay(
        Leg { src: &mut up, sink: &mut agent_tx, bytes: &uncounted, tally: &untallied, first: None },
        Leg { src: &mut agent_rx, sink: &mut down, bytes: &uncounted, tally: &untallied, first: None },
    )
    .await;
    if let Err(e) = r {
        shard.stats.error(e.label);
    }
}
