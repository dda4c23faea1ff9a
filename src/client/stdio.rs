//! `ringpeer dial`: pipes stdin and stdout through one dial, like `nc`.
//!
//! Invariants: stdin EOF half-closes the dial (END_STREAM) and the response
//! keeps flowing until the agent's status arrives; blocking stdio runs on
//! two plain threads joined to the executor by pipes, so the executor never
//! blocks.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use crate::relay::splice::{splice, End, READ_CHUNK};
use crate::relay::Item;
use crate::runtime::pipe::pipe;
use crate::transport::h2conf::H2Tuning;
use crate::wire::codec::DataBuf;
use crate::wire::status::Status;
use crate::wire::DialTarget;

use super::Client;

/// Dials `target` through `proxy` and pipes stdio; returns the call's status.
pub fn dial_stdio(
    proxy: String,
    target: DialTarget,
    tls: Arc<rustls::ClientConfig>,
    deadline: Duration,
) -> anyhow::Result<Status> {
    let (mut in_tx, in_rx) = pipe(16);
    let (out_tx, mut out_rx) = pipe(16);
    std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = DataBuf::new(READ_CHUNK);
        loop {
            let n = match stdin.read(buf.spare()) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let item = if n == 0 { Item::End(None) } else { Item::Data(buf.commit(n)) };
            let end = n == 0;
            if futures_lite::future::block_on(in_tx.send(item)).is_err() || end {
                return;
            }
        }
    })?;
    let writer = std::thread::Builder::new().name("stdout".into()).spawn(move || {
        let mut stdout = std::io::stdout().lock();
        while let Some(Item::Data(b)) = futures_lite::future::block_on(out_rx.recv()) {
            if stdout.write_all(&b).and_then(|_| stdout.flush()).is_err() {
                return;
            }
        }
    })?;
    let status = crate::runtime::block_on("dial", move || async move {
        let client = match Client::connect(&proxy, &tls, &H2Tuning::default()).await {
            Ok(c) => c,
            Err(e) => return Err(e.to_string()),
        };
        let o = match client.dial(&target, deadline).await {
            Ok(o) => o,
            Err(e) => return Ok(e.status()),
        };
        Ok(splice(in_rx, out_tx, o.send, o.recv, End::Client).await.unwrap_or_else(|e| e.status()))
    })?
    .map_err(anyhow::Error::msg)?;
    let _ = writer.join();
    Ok(status)
}
