//! Workloads shared by `demo`, `bench` and the tests: ping-pong latency,
//! bulk throughput and echo round-trips, both through the fleet and direct.
//!
//! Invariant: the direct and proxied variants of a workload use the same
//! runtime (glommio), buffer sizes and target, so their ratio measures the
//! data plane and nothing else.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hdrhistogram::Histogram;

use crate::client::{Client, DialIo};
use crate::wire::codec::encode_data;
use crate::wire::error::Error;
use crate::wire::DialTarget;

/// Bytes per write in bulk transfers.
pub const BULK_CHUNK: usize = 64 << 10;

fn io_status(e: std::io::Error) -> Error {
    Error::internal(e.to_string())
}

/// Opens an established dial.
pub async fn open(client: &Client, target: &DialTarget) -> Result<DialIo, Error> {
    client.dial(target, Duration::from_secs(10)).await.map(DialIo::from)
}

/// A latency histogram in nanoseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// `iters` round-trips of `size` bytes over one dial to an echo service;
/// records round-trip times (ns).
pub async fn pingpong_proxy(
    client: &Client,
    target: &DialTarget,
    iters: usize,
    size: usize,
) -> Result<Histogram<u64>, Error> {
    let mut d = open(client, target).await?;
    let msg = vec![0x5au8; size];
    let mut h = histogram();
    let mut got = Vec::with_capacity(size);
    for _ in 0..iters {
        let t0 = Instant::now();
        d.write(&msg).await?;
        got.clear();
        d.read_exact(&mut got, size).await?;
        h.record(t0.elapsed().as_nanos() as u64).ok();
    }
    d.close_write()?;
    while d.read().await?.is_some() {}
    Ok(h)
}

/// The same round-trips over a direct TCP connection to the echo target.
pub async fn pingpong_direct(addr: SocketAddr, iters: usize, size: usize) -> Result<Histogram<u64>, Error> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| io_status(e.into()))?;
    s.set_nodelay(true).ok();
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut h = histogram();
    for _ in 0..iters {
        let t0 = Instant::now();
        s.write_all(&msg).await.map_err(io_status)?;
        s.read_exact(&mut buf).await.map_err(io_status)?;
        h.record(t0.elapsed().as_nanos() as u64).ok();
    }
    Ok(h)
}

/// Round-trips with plain blocking sockets (the way sockperf measures), for
/// an absolute reference next to the glommio client figures.
pub fn pingpong_direct_blocking(addr: SocketAddr, iters: usize, size: usize) -> std::io::Result<Histogram<u64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut h = histogram();
    for _ in 0..iters {
        let t0 = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        h.record(t0.elapsed().as_nanos() as u64).ok();
    }
    Ok(h)
}

/// Sends `bytes` to a sink service over one dial; returns the elapsed time
/// once the sink confirmed the count.
pub async fn bulk_proxy(client: &Client, target: &DialTarget, bytes: u64) -> Result<Duration, Error> {
    let mut d = open(client, target).await?;
    let chunk: Bytes = encode_data(&vec![0xa5u8; BULK_CHUNK]);
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        d.write_framed(chunk.clone()).await?;
        sent += BULK_CHUNK as u64;
    }
    d.close_write()?;
    let mut ack = Vec::new();
    d.read_exact(&mut ack, 8).await?;
    let elapsed = t0.elapsed();
    let n = u64::from_be_bytes(ack[..8].try_into().expect("8 bytes"));
    if n != sent {
        return Err(Error::internal(format!("sink counted {n} bytes, sent {sent}")));
    }
    Ok(elapsed)
}

/// Sends `bytes` directly to the sink target.
pub async fn bulk_direct(addr: SocketAddr, bytes: u64) -> Result<Duration, Error> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| io_status(e.into()))?;
    let chunk = vec![0xa5u8; BULK_CHUNK];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&chunk).await.map_err(io_status)?;
        sent += BULK_CHUNK as u64;
    }
    s.shutdown(std::net::Shutdown::Write).await.map_err(|e| io_status(e.into()))?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await.map_err(io_status)?;
    if u64::from_be_bytes(ack) != sent {
        return Err(Error::internal("sink count mismatch"));
    }
    Ok(t0.elapsed())
}

/// Sends `data` to an echo service in 64 KiB steps and returns what came back.
pub async fn echo_roundtrip(client: &Client, target: &DialTarget, data: &[u8]) -> Result<Vec<u8>, Error> {
    let mut d = open(client, target).await?;
    let mut back = Vec::with_capacity(data.len());
    for c in data.chunks(BULK_CHUNK) {
        d.write(c).await?;
        let want = back.len() + c.len();
        d.read_exact(&mut back, want).await?;
    }
    d.close_write()?;
    while let Some(b) = d.read().await? {
        back.extend_from_slice(&b);
    }
    let s = d.status().await;
    if !s.is_ok() {
        return Err(Error::from_status(crate::wire::error::Side::Agent, s));
    }
    Ok(back)
}

/// Gbit/s for `bytes` in `d`.
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// `n` concurrent bulk transfers of `bytes` each through the fleet; returns
/// the wall time until every sink confirmed.
pub async fn bulk_proxy_n(client: &Client, target: &DialTarget, bytes: u64, n: usize) -> Result<Duration, Error> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, t) = (client.clone(), target.clone());
            glommio::spawn_local(async move { bulk_proxy(&c, &t, bytes).await })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok(t0.elapsed())
}

/// `n` concurrent direct bulk transfers of `bytes` each.
pub async fn bulk_direct_n(addr: SocketAddr, bytes: u64, n: usize) -> Result<Duration, Error> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n).map(|_| glommio::spawn_local(bulk_direct(addr, bytes))).collect();
    for task in tasks {
        task.await?;
    }
    Ok(t0.elapsed())
}

/// Streams set up per second: `count` dials (open, 1-byte echo, close) run
/// by `concurrency` loops over one client connection.
pub async fn setup_rate_proxy(
    client: &Client,
    target: &DialTarget,
    count: usize,
    concurrency: usize,
) -> Result<f64, Error> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (c, t) = (client.clone(), target.clone());
            glommio::spawn_local(async move {
                for _ in 0..count / concurrency {
                    echo_roundtrip(&c, &t, b"x").await?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok((count / concurrency * concurrency) as f64 / t0.elapsed().as_secs_f64())
}

/// TCP connections set up per second (connect, 1-byte echo, close).
pub async fn setup_rate_direct(addr: SocketAddr, count: usize, concurrency: usize) -> Result<f64, Error> {
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            glommio::spawn_local(async move {
                for _ in 0..count / concurrency {
                    let mut s = TcpStream::connect(addr).await.map_err(|e| io_status(e.into()))?;
                    s.write_all(b"x").await.map_err(io_status)?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.map_err(io_status)?;
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok((count / concurrency * concurrency) as f64 / t0.elapsed().as_secs_f64())
}
