//! Client side: connect to a proxy's client edge (mTLS, role `client`),
//! open dials, and splice them to stdio (`ringpeer dial`) or to local TCP
//! connections multiplexed over one HTTP/2 connection (`ringpeer forward`).
//!
//! Invariants: one HTTP/2 connection carries every stream of a client; it is
//! re-established when it dies; a dial that fails prints the proxy's status.

pub mod stdio;

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use glommio::net::TcpStream;
use h2::client::SendRequest;

use crate::relay::handshake::{open_dial, Opened};
use crate::relay::splice::{splice, split_tcp, Side};
use crate::runtime::Shutdown;
use crate::transport::h2conf::{drive_client, H2Tuning};
use crate::transport::identity::Role;
use crate::transport::tls::{TlsFiles, TlsMaterial};
use crate::transport::{connect_tls, TransportError};
use crate::wire::codec::encode_msg;
use crate::wire::paths;
use crate::wire::status::{Code, Status};
use crate::wire::DialTarget;

/// Loads a client identity (`client.pem` by default) from a certs directory.
pub fn client_tls(dir: &Path, name: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let m = TlsMaterial::load_any_cluster(&TlsFiles::in_dir(dir, name), Role::Client)?;
    Ok(m.client_config(Role::Proxy, None)?)
}

/// A client connection to a proxy.
#[derive(Clone)]
pub struct Client {
    send: SendRequest<Bytes>,
    proxy: String,
}

impl Client {
    /// Connects to the proxy's client edge at `addr`; the connection is
    /// driven by a task on the current executor.
    pub async fn connect(addr: &str, tls: &Arc<rustls::ClientConfig>, h2: &H2Tuning) -> Result<Client, TransportError> {
        let (stream, peer) = connect_tls(tls, addr, h2.handshake_timeout()).await?;
        let (send, conn) = crate::runtime::timeout(h2.handshake_timeout(), h2.client().handshake::<_, Bytes>(stream))
            .await
            .map_err(|_| TransportError::Timeout { addr: addr.to_string() })?
            .map_err(|source| TransportError::H2 { addr: addr.to_string(), source })?;
        let h2 = h2.clone();
        glommio::spawn_local(async move { drive_client(conn, &h2).await }).detach();
        Ok(Client { send, proxy: peer.name })
    }

    /// The proxy's id (from its certificate).
    pub fn proxy(&self) -> &str {
        &self.proxy
    }

    /// Opens a dial and waits until it is established.
    pub async fn dial(&self, target: &DialTarget, deadline: Duration) -> Result<Opened, Status> {
        let mut send = self.send.clone();
        open_dial(&mut send, &self.proxy, paths::PROXY_DIAL, encode_msg(&target.to_frame()), deadline).await
    }

    /// Opens a dial on another gRPC path (e.g. a peer port's DialNode),
    /// marked as having crossed `hops` peer links.
    pub async fn dial_path(
        &self,
        path: &str,
        target: &DialTarget,
        deadline: Duration,
        hops: u8,
    ) -> Result<Opened, Status> {
        let mut send = self.send.clone();
        let first = encode_msg(&target.to_frame());
        crate::relay::handshake::open_dial_hops(&mut send, &self.proxy, path, first, deadline, hops).await
    }

    /// Dials and splices the dial to a TCP connection until the call ends.
    pub async fn dial_tcp(&self, target: &DialTarget, tcp: TcpStream, deadline: Duration) -> Result<Status, Status> {
        let o = self.dial(target, deadline).await?;
        let (inp, out) = split_tcp(tcp).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        splice(inp, out, o.tx, o.rx, o.dec, Side::Client).await
    }

    /// Whether the connection can still open streams.
    pub fn is_alive(&self) -> bool {
        let mut send = self.send.clone();
        futures_lite::future::block_on(futures_lite::future::poll_once(std::future::poll_fn(|cx| send.poll_ready(cx))))
            .is_none_or(|r| r.is_ok())
    }
}

/// Options of `ringpeer forward`.
pub struct ForwardOpts {
    /// Local listen address.
    pub listen: String,
    /// What every connection dials.
    pub target: DialTarget,
    /// Proxy client edge address.
    pub proxy: String,
    /// Client TLS config.
    pub tls: Arc<rustls::ClientConfig>,
    /// Dial deadline.
    pub deadline: Duration,
}

/// Runs `ringpeer forward` until `shutdown`: every local connection becomes
/// a stream on one shared HTTP/2 connection to the proxy.
pub fn forward(opts: ForwardOpts, shutdown: Shutdown) -> anyhow::Result<()> {
    let addr = crate::runtime::listeners::parse_addr(&opts.listen, "--listen")?;
    let l = crate::runtime::listeners::bind_group(addr, 1, "--listen")?.pop().expect("one listener");
    eprintln!("ringpeer: forwarding {} -> {} via {}", l.local_addr()?, opts.target, opts.proxy);
    crate::runtime::block_on("forward", move || async move {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: a bound, listening socket we own.
        let l = unsafe { glommio::net::TcpListener::from_raw_fd(l.into_raw_fd()) };
        let h2 = H2Tuning::default();
        let opts = Rc::new(opts);
        let client: Rc<std::cell::RefCell<Option<Client>>> = Rc::default();
        loop {
            let tcp = futures_lite::future::or(async { Some(l.accept().await) }, async {
                shutdown.wait().await;
                None
            })
            .await;
            let Some(tcp) = tcp else { return };
            let Ok(tcp) = tcp else { continue };
            let cur = client.borrow().as_ref().filter(|c| c.is_alive()).cloned();
            let c = match cur {
                Some(c) => c,
                None => match Client::connect(&opts.proxy, &opts.tls, &h2).await {
                    Ok(c) => {
                        *client.borrow_mut() = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        eprintln!("ringpeer: {e}");
                        continue;
                    }
                },
            };
            let opts = opts.clone();
            glommio::spawn_local(async move {
                match c.dial_tcp(&opts.target, tcp, opts.deadline).await {
                    Ok(s) if s.is_ok() => {}
                    Ok(s) | Err(s) => eprintln!("ringpeer: dial {}: {s}", opts.target),
                }
            })
            .detach();
        }
    })?;
    Ok(())
}

/// An established dial driven by a program (demo, bench, tests): write
/// payload, half-close, read payload, then the status.
pub struct DialIo {
    tx: h2::SendStream<Bytes>,
    rx: h2::RecvStream,
    dec: crate::wire::codec::FrameDecoder,
    pending: usize,
}

impl From<Opened> for DialIo {
    fn from(o: Opened) -> DialIo {
        DialIo { tx: o.tx, rx: o.rx, dec: o.dec, pending: 0 }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::new(Code::Unavailable, e.to_string())
}

impl DialIo {
    /// Sends `payload` as one Data message (copied into a frame).
    pub async fn write(&mut self, payload: &[u8]) -> Result<(), Status> {
        self.write_framed(crate::wire::codec::encode_data(payload)).await
    }

    /// Sends an already framed Data message.
    pub async fn write_framed(&mut self, framed: Bytes) -> Result<(), Status> {
        crate::relay::wait_capacity(&mut self.tx, framed.len()).await.map_err(unavailable)?;
        self.tx.send_data(framed, false).map_err(unavailable)
    }

    /// Half-closes: no more writes.
    pub fn close_write(&mut self) -> Result<(), Status> {
        self.tx.send_data(Bytes::new(), true).map_err(unavailable)
    }

    /// The next piece of payload; `None` at the end of the response.
    pub async fn read(&mut self) -> Result<Option<Bytes>, Status> {
        use crate::wire::codec::Event;
        loop {
            if let Some(ev) = self.dec.decode_next().map_err(|e| e.status())? {
                match ev {
                    Event::Data(b) => return Ok(Some(b)),
                    Event::Frame(_) => return Err(Status::new(Code::InvalidArgument, "unexpected frame")),
                }
            }
            if self.pending > 0 {
                let _ = self.rx.flow_control().release_capacity(self.pending);
                self.pending = 0;
            }
            match std::future::poll_fn(|cx| self.rx.poll_data(cx)).await {
                Some(Ok(c)) => {
                    self.pending = c.len();
                    self.dec.push(c);
                }
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Ok(None),
            }
        }
    }

    /// Reads exactly `n` payload bytes into `out`.
    pub async fn read_exact(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), Status> {
        while out.len() < n {
            match self.read().await? {
                Some(b) => out.extend_from_slice(&b),
                None => return Err(Status::new(Code::Unavailable, "response ended early")),
            }
        }
        Ok(())
    }

    /// After `read` returned `None`: the call's status from the trailers.
    pub async fn status(&mut self) -> Status {
        match std::future::poll_fn(|cx| self.rx.poll_trailers(cx)).await {
            Ok(t) => t
                .as_ref()
                .and_then(Status::from_headers)
                .unwrap_or_else(|| Status::new(Code::Unknown, "no status in trailers")),
            Err(e) => unavailable(e),
        }
    }
}
