//! One dial on a tunnel: read the `DialRequest`, fit it in the budgets,
//! pick the service, check its allow list, connect to the target, answer
//! established, and splice bytes until either side ends.
//!
//! Invariants: every refusal is answered with an error that names what
//! refused (the budget, the service, the client) and is counted by its
//! label in [`super::stats::AgentStats`]; a refused client never reaches
//! the target; a dial the proxy resets stops connecting at once; the
//! services are read once per dial (a reload swaps them whole).

use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use futures_lite::future::or;
use glommio::net::TcpStream;
use h2::server::SendResponse;
use h2::RecvStream;
use http::Request;

use super::services::{self, CLIENT_ID_HEADER};
use super::AgentCtx;
use crate::relay::call::{answer_ok, established, read_dial_request};
use crate::relay::grpc::GrpcRecv;
use crate::relay::splice::{splice, split_tcp_metered, End};
use crate::runtime::budget::exceeded;
use crate::runtime::stats::Held;
use crate::runtime::timeout;
use crate::transport::h2conf::{ActiveStreams, SetupGuard, StreamGuard};
use crate::transport::resolve;
use crate::wire::codec::FrameDecoder;
use crate::wire::error::{Error, Label, Retry, Side};

/// The budgets a dial must fit in: streams and set-ups on its tunnel, the
/// shard's buffered bytes. Checked once the `DialRequest` is in: refusing
/// at the headers would leave the proxy's request DATA arriving on a reset
/// stream, and h2 counts each such arrival against the connection
/// (`max_local_error_reset_streams`), so a burst of refusals would end the
/// whole tunnel.
fn admit(ctx: &AgentCtx, active: &ActiveStreams) -> Result<(StreamGuard, SetupGuard), Error> {
    let l = &ctx.limits;
    let stream = active
        .try_enter()
        .ok_or_else(|| exceeded("streams_per_conn", l.streams_per_conn, Label::BudgetStreamsPerConn, Side::Agent))?;
    let setup = active
        .enter_setup()
        .ok_or_else(|| exceeded("setup_per_conn", l.setup_per_conn, Label::BudgetSetupPerConn, Side::Agent))?;
    if ctx.buf.over_budget() {
        return Err(exceeded("shard_buffer_bytes", ctx.buf.budget(), Label::BudgetShardBuffer, Side::Agent));
    }
    Ok((stream, setup))
}

pub(super) async fn handle(
    ctx: Rc<AgentCtx>,
    active: &ActiveStreams,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    // The client the proxies vouch for (`None` only from a proxy that
    // predates identity propagation).
    let client = req.headers().get(CLIENT_ID_HEADER).cloned();
    let mut rx = GrpcRecv::new(req.into_body(), FrameDecoder::new(), Side::Proxy);
    ctx.stats.dials.inc();
    let target = match read_dial_request(&mut rx, ctx.connect_timeout * 2).await {
        Ok(v) => v,
        Err(e) => return ctx.fail(respond, &e),
    };
    let (_stream, setup) = match admit(&ctx, active) {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(agent = ctx.id, error = %e, "dial refused");
            return ctx.fail(respond, &e);
        }
    };
    let current = ctx.services.current();
    let (service, spec) = match services::pick(&ctx.id, &current.services, &target.service) {
        Ok(v) => v,
        Err(e) => return ctx.fail(respond, &e),
    };
    let who = client.as_ref().and_then(|c| c.to_str().ok()).unwrap_or("");
    tracing::debug!(agent = ctx.id, client = who, source = target.source, service, "dial");
    // Before connecting: a refused client never reaches the target.
    if let Err(e) = services::authorize(&ctx.id, &ctx.cluster, service, spec, client.as_ref()) {
        tracing::debug!(agent = ctx.id, client = who, source = target.source, service, error = %e, "dial refused");
        return ctx.fail(respond, &e);
    }
    let addr = spec.addr.as_str();
    let connect = async {
        let sa = resolve(addr).await?;
        TcpStream::connect(sa).await.map_err(std::io::Error::from)
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        let m = format!("service {service} at {addr} on agent {:?}: {e}", ctx.id);
        Error::unavailable(Side::Target, Retry::Safe, Label::TargetConnect, m)
    };
    // A dial the proxy resets (its client left) stops connecting at once.
    let reset = async {
        let _ = std::future::poll_fn(|cx| respond.poll_reset(cx)).await;
        None
    };
    let t0 = Instant::now();
    let tcp = match or(async { Some(timeout(ctx.connect_timeout, connect).await) }, reset).await {
        Some(Ok(Ok(t))) => t,
        Some(Ok(Err(e))) => return ctx.fail(respond, &unavailable(&e)),
        Some(Err(_)) => return ctx.fail(respond, &unavailable(&"connect timed out")),
        None => {
            tracing::debug!(agent = ctx.id, service, "dial reset before the target connected");
            return;
        }
    };
    let (inp, out) = match split_tcp_metered(tcp, &ctx.buf) {
        Ok(v) => v,
        Err(e) => return ctx.fail(respond, &Error::internal(e.to_string())),
    };
    ctx.stats.connect.record(t0.elapsed());
    let Ok(mut tx) = answer_ok(&mut respond, Side::Proxy) else { return };
    if tx.send_now(established()).is_err() {
        return;
    }
    ctx.stats.established.inc();
    let _open = Held::new(&ctx.stats.open_streams);
    rx.set_established();
    rx.meter(&ctx.buf);
    drop(setup);
    tracing::debug!(agent = ctx.id, service, addr, "dial established");
    match splice(inp, out, tx, rx, End::Agent).await {
        Ok(s) => tracing::debug!(agent = ctx.id, service, status = ?s.code, "dial ended"),
        Err(e) => tracing::debug!(agent = ctx.id, service, error = %e, "dial ended with an error"),
    }
}
