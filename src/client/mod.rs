//! Client side: connect to a proxy's client edge (mTLS, role `client`),
//! open dials, and splice them to stdio (`ringpeer dial`) or to local TCP
//! connections multiplexed over one HTTP/2 connection (`ringpeer forward`).
//!
//! Invariants: one HTTP/2 connection carries every stream of a client; it is
//! re-established when it dies or the proxy sends GOAWAY (a draining
//! proxy: its open streams go on, new dials go to a new connection, which
//! its successor accepts); a dial refused because its connection was going
//! away is sent again on the new one, since the proxy never processed it
//! ([`Dialer`]); a dial that fails prints the proxy's status.

pub mod stdio;

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use glommio::net::TcpStream;
use h2::client::SendRequest;

use crate::relay::call::{self, Established};
use crate::relay::splice::{splice, split_tcp, End};
use crate::relay::{GrpcRecv, GrpcSend};
use crate::runtime::Shutdown;
use crate::transport::h2conf::{drive_client, H2Tuning};
use crate::transport::identity::Role;
use crate::transport::tls::{TlsFiles, TlsMaterial};
use crate::transport::{connect_tls, TransportError};
use crate::wire::codec::encode_msg;
use crate::wire::error::{Error, Side};
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
    local: Option<std::net::SocketAddr>,
}

impl Client {
    /// Connects to the proxy's client edge at `addr`; the connection is
    /// driven by a task on the current executor.
    pub async fn connect(addr: &str, tls: &Arc<rustls::ClientConfig>, h2: &H2Tuning) -> Result<Client, TransportError> {
        let (stream, peer) = connect_tls(tls, addr, h2.handshake_timeout()).await?;
        let local = stream.get_ref().0.get_ref().local_addr().ok();
        let (send, conn) = crate::runtime::timeout(h2.handshake_timeout(), h2.client().handshake::<_, Bytes>(stream))
            .await
            .map_err(|_| TransportError::Timeout { addr: addr.to_string() })?
            .map_err(|source| TransportError::H2 { addr: addr.to_string(), source })?;
        let h2 = h2.clone();
        glommio::spawn_local(async move { drive_client(conn, &h2).await }).detach();
        Ok(Client { send, proxy: peer.name, local })
    }

    /// This end's socket address (what the proxy sees as the source).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.local
    }

    /// The proxy's id (from its certificate).
    pub fn proxy(&self) -> &str {
        &self.proxy
    }

    /// Opens a dial and waits until it is established.
    pub async fn dial(&self, target: &DialTarget, deadline: Duration) -> Result<Established, Error> {
        self.dial_path(paths::PROXY_DIAL, target, deadline, 0).await
    }

    /// Opens a dial on another gRPC path (e.g. a peer port's DialNode),
    /// marked as having crossed `hops` peer links.
    pub async fn dial_path(
        &self,
        path: &'static str,
        target: &DialTarget,
        deadline: Duration,
        hops: u8,
    ) -> Result<Established, Error> {
        self.dial_with(path, call::Hop { hops, client: None }, target, deadline).await
    }

    /// [`dial_path`](Self::dial_path) with the hop headers given as they
    /// are: what a peer proxy sends (tests of the serving proxy's checks).
    pub async fn dial_with(
        &self,
        path: &'static str,
        hop: call::Hop<'_>,
        target: &DialTarget,
        deadline: Duration,
    ) -> Result<Established, Error> {
        let mut send = self.send.clone();
        let first = encode_msg(&target.to_frame());
        call::open(&mut send, paths::uri(path), hop, first, Side::Proxy, deadline).await
    }

    /// Dials and splices the dial to a TCP connection until the call ends.
    pub async fn dial_tcp(&self, target: &DialTarget, tcp: TcpStream, deadline: Duration) -> Result<Status, Error> {
        let o = self.dial(target, deadline).await?;
        let (inp, out) = split_tcp(tcp).map_err(|e| Error::internal(e.to_string()))?;
        splice(inp, out, o.send, o.recv, End::Client).await
    }

    /// Whether the connection can still open streams.
    pub fn is_alive(&self) -> bool {
        let mut send = self.send.clone();
        futures_lite::future::block_on(futures_lite::future::poll_once(std::future::poll_fn(|cx| send.poll_ready(cx))))
            .is_none_or(|r| r.is_ok())
    }
}

/// A client that keeps one connection to a proxy and replaces it when it
/// dies or goes away. Connecting is single-flight: dials that find no live
/// connection wait for the one being made.
pub struct Dialer {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    h2: H2Tuning,
    /// The current connection and its generation.
    cur: std::cell::RefCell<Option<(Client, u64)>>,
    connecting: std::cell::RefCell<Option<Connecting>>,
    generation: std::cell::Cell<u64>,
}

type Connecting = futures_util::future::Shared<futures_util::future::LocalBoxFuture<'static, Result<Client, Error>>>;

impl Dialer {
    /// A dialer for the proxy client edge at `addr` (connects on first use).
    pub fn new(addr: &str, tls: Arc<rustls::ClientConfig>, h2: H2Tuning) -> Dialer {
        Dialer {
            addr: addr.to_string(),
            tls,
            h2,
            cur: Default::default(),
            connecting: Default::default(),
            generation: Default::default(),
        }
    }

    /// A live connection newer than generation `after` (0: any).
    async fn client(&self, after: u64) -> Result<(Client, u64), Error> {
        if let Some((c, g)) = self.cur.borrow().as_ref().filter(|(c, g)| *g > after && c.is_alive()) {
            return Ok((c.clone(), *g));
        }
        let f = self.connecting.borrow().clone();
        let f = match f {
            Some(f) => f,
            None => {
                use futures_util::FutureExt;
                let (addr, tls, h2) = (self.addr.clone(), self.tls.clone(), self.h2.clone());
                let f = async move {
                    Client::connect(&addr, &tls, &h2).await.map_err(|e| {
                        Error::unavailable(Side::Proxy, crate::wire::error::Retry::Safe, e.label(), e.to_string())
                    })
                }
                .boxed_local()
                .shared();
                *self.connecting.borrow_mut() = Some(f.clone());
                f
            }
        };
        let r = f.clone().await;
        // The first waiter to wake installs the result.
        let mine = self.connecting.borrow().as_ref().is_some_and(|c| c.ptr_eq(&f));
        if mine {
            self.connecting.borrow_mut().take();
            if let Ok(c) = &r {
                self.generation.set(self.generation.get() + 1);
                *self.cur.borrow_mut() = Some((c.clone(), self.generation.get()));
            }
        }
        let c = r?;
        Ok((c, self.generation.get()))
    }

    /// Opens a dial; when the connection turns out to be going away (or
    /// lost) before the proxy took the dial, sends it once more on a new
    /// connection within the same deadline.
    pub async fn dial(&self, target: &DialTarget, deadline: Duration) -> Result<Established, Error> {
        let end = std::time::Instant::now() + deadline;
        let (c, g) = self.client(0).await?;
        match c.dial(target, deadline).await {
            Err(e) if e.retry == crate::wire::error::Retry::Safe && unprocessed(&e) => {
                tracing::debug!(error = %e, "connection going away; dialing again on a new one");
                let left = end.saturating_duration_since(std::time::Instant::now());
                self.client(g).await?.0.dial(target, left).await
            }
            r => r,
        }
    }
}

/// Whether the proxy never saw the dial: its connection was going away or
/// gone before the stream was taken.
fn unprocessed(e: &Error) -> bool {
    use crate::wire::error::Label;
    e.side == Side::Proxy && matches!(e.label, Label::GoAway | Label::Refused | Label::ConnectionLost | Label::H2)
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
        let opts = Rc::new(opts);
        let dialer = Rc::new(Dialer::new(&opts.proxy, opts.tls.clone(), H2Tuning::default()));
        loop {
            let tcp = futures_lite::future::or(async { Some(l.accept().await) }, async {
                shutdown.wait().await;
                None
            })
            .await;
            let Some(tcp) = tcp else { return };
            let Ok(tcp) = tcp else { continue };
            let (opts, dialer) = (opts.clone(), dialer.clone());
            glommio::spawn_local(async move {
                let r = async {
                    let o = dialer.dial(&opts.target, opts.deadline).await?;
                    let (inp, out) = split_tcp(tcp).map_err(|e| Error::internal(e.to_string()))?;
                    splice(inp, out, o.send, o.recv, End::Client).await
                };
                match r.await {
                    Ok(s) if s.is_ok() => {}
                    Ok(s) => eprintln!("ringpeer: dial {}: {s}", opts.target),
                    Err(e) => eprintln!("ringpeer: dial {}: {e}", opts.target),
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
    send: GrpcSend,
    recv: GrpcRecv,
}

impl From<Established> for DialIo {
    fn from(o: Established) -> DialIo {
        DialIo { send: o.send, recv: o.recv }
    }
}

impl DialIo {
    /// Sends `payload` as one Data message (copied into a frame).
    pub async fn write(&mut self, payload: &[u8]) -> Result<(), Error> {
        self.write_framed(crate::wire::codec::encode_data(payload)).await
    }

    /// Sends an already framed Data message.
    pub async fn write_framed(&mut self, framed: Bytes) -> Result<(), Error> {
        self.send.send(framed).await
    }

    /// Half-closes: no more writes.
    pub fn close_write(&mut self) -> Result<(), Error> {
        self.send.close()
    }

    /// Resets the dial (RST_STREAM CANCEL), as a client that gives up would.
    pub fn cancel(&mut self) {
        self.send.reset(h2::Reason::CANCEL);
    }

    /// The next piece of payload; `None` at the end of the response.
    /// Asking for it returns the previous piece's flow-control credit.
    pub async fn read(&mut self) -> Result<Option<Bytes>, Error> {
        self.recv.next_data().await
    }

    /// Reads exactly `n` payload bytes into `out`.
    pub async fn read_exact(&mut self, out: &mut Vec<u8>, n: usize) -> Result<(), Error> {
        while out.len() < n {
            match self.read().await? {
                Some(b) => out.extend_from_slice(&b),
                None => return Err(Error::bad_request("response ended early").on(Side::Proxy)),
            }
        }
        Ok(())
    }

    /// After `read` returned `None`: the call's status from the trailers.
    pub async fn status(&mut self) -> Status {
        match self.recv.trailers().await {
            Ok(t) => t
                .as_ref()
                .and_then(Status::from_headers)
                .unwrap_or_else(|| Status::new(Code::Unknown, "no status in trailers")),
            Err(e) => e.status(),
        }
    }
}
