//! Cross-shard dials: a client that landed on shard A dials an agent whose
//! tunnel is on shard B. A keeps the client stream, B opens the agent
//! stream, and two [`pipe`]s move the `Bytes` between them.
//!
//! Invariants: bytes cross shards by move, never by copy; the first item B
//! sends down is either establishment bytes (success) or an `End` with the
//! error status, so A answers the client exactly once.

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use std::rc::Rc;
use std::time::Duration;

use super::{fail, StreamCount};
use crate::proxy::shard::{CrossDial, Shard, ShardMsg};
use crate::relay::handshake::{open_dial, respond_ok};
use crate::relay::{relay, H2Sink, H2Source, Sink};
use crate::runtime::pipe::{pipe, Item};
use crate::runtime::timeout;
use crate::wire::codec::encode_msg;
use crate::wire::paths;
use crate::wire::status::{Code, Status};
use crate::wire::DialTarget;

/// Items buffered per direction between two shards.
pub const PIPE_CAP: usize = 64;

/// Shard A: the client's side of a cross-shard dial.
pub async fn entry_side(
    shard: &Shard,
    owner: u32,
    target: DialTarget,
    rx: RecvStream,
    rest: Bytes,
    mut respond: SendResponse<Bytes>,
) {
    shard.stats.dials_cross_shard.inc();
    let (mut up_tx, up_rx) = pipe(PIPE_CAP);
    let (down_tx, mut down_rx) = pipe(PIPE_CAP);
    let msg = ShardMsg::Dial(Box::new(CrossDial { target, up: up_rx, down: down_tx }));
    if shard.mailboxes[owner as usize].post(msg).is_err() {
        return fail(shard, respond, &Status::new(Code::Unavailable, format!("shard {owner} has stopped")));
    }
    let first = timeout(shard.shared.dial_timeout + Duration::from_secs(1), down_rx.recv()).await;
    let first = match first {
        Ok(Some(Item::Data(b))) => b,
        Ok(Some(Item::End(Some(s)))) => return fail(shard, respond, &s),
        _ => {
            return fail(
                shard,
                respond,
                &Status::new(Code::Unavailable, format!("shard {owner} did not answer the dial")),
            )
        }
    };
    let Ok(tx) = respond_ok(&mut respond) else { return };
    let _count = StreamCount::new(shard);
    let mut down = H2Sink { tx, trailers: true };
    let mut up_src = H2Source { rx, trailers: false };
    let run = async {
        down.send(first).await?;
        if !rest.is_empty() {
            up_tx.send(Item::Data(rest)).await.map_err(|_| crate::relay::RelayError::Broken)?;
        }
        relay((&mut up_src, &mut up_tx), (&mut down_rx, &mut down), &shard.stats.bytes_up, &shard.stats.bytes_down)
            .await
    };
    if let Err(e) = run.await {
        shard.stats.error(e.label());
        let _ = down.tx.send_trailers(e.status().to_trailers());
    }
}

/// Shard B: opens the agent stream for a dial that entered elsewhere.
pub async fn serve_cross_dial(shard: Rc<Shard>, d: CrossDial) {
    let CrossDial { target, mut up, mut down } = d;
    let Some(mut t) = shard.local_tunnel(&target.agent) else {
        let s = Status::new(Code::Unavailable, format!("the tunnel to agent {:?} just went away", target.agent));
        let _ = down.send(Item::End(Some(s))).await;
        return;
    };
    let first = encode_msg(&target.to_frame());
    let opened = match open_dial(&mut t.send, &target.agent, paths::AGENT_DIAL, first, shard.shared.dial_timeout).await
    {
        Ok(o) => o,
        Err(s) => {
            let _ = down.send(Item::End(Some(s))).await;
            return;
        }
    };
    let _count = StreamCount::new(&shard);
    let mut agent_tx = H2Sink { tx: opened.tx, trailers: false };
    let mut agent_rx = H2Source { rx: opened.rx, trailers: true };
    let run = async {
        for b in opened.held {
            down.send(Item::Data(b)).await.map_err(|_| crate::relay::RelayError::Broken)?;
        }
        relay((&mut up, &mut agent_tx), (&mut agent_rx, &mut down), &shard.stats.bytes_up, &shard.stats.bytes_down)
            .await
    };
    if let Err(e) = run.await {
        shard.stats.error(e.label());
        let _ = down.send(Item::End(Some(e.status()))).await;
    }
}
