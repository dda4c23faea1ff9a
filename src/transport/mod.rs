//! Transport: sockets, TLS and HTTP/2 set-up shared by every link kind.
//!
//! Invariants: every connection is TLS 1.3 with mutual authentication and
//! ALPN `h2`; handshakes run under a deadline; every HTTP/2 endpoint is built
//! from [`h2conf::H2Tuning`] (no h2 default is trusted).

pub mod certs;
pub mod flood;
pub mod h2conf;
pub mod h2limits;
pub mod identity;
pub mod io;
pub mod keepalive;
pub mod reload;
pub mod tls;
pub mod tuning;
pub mod verify;
pub mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use glommio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::runtime::timeout;
use crate::wire::error::Label;
use identity::SpiffeId;
use io::GlommioIo;

/// TLS stream on the accepting side.
pub type ServerTls = tokio_rustls::server::TlsStream<GlommioIo>;
/// TLS stream on the dialling side.
pub type ClientTls = tokio_rustls::client::TlsStream<GlommioIo>;

/// A connection set-up failure, with a static label for metrics.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Address dialled.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS handshake failed (bad certificate, wrong role, wrong CA ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// Peer address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The peer did not negotiate ALPN h2.
    #[error("{addr} did not negotiate ALPN h2")]
    NoAlpn {
        /// Peer address.
        addr: String,
    },
    /// The deadline passed.
    #[error("connection set-up with {addr} timed out")]
    Timeout {
        /// Peer address.
        addr: String,
    },
    /// HTTP/2 handshake failed.
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    H2 {
        /// Peer address.
        addr: String,
        /// Cause.
        source: h2::Error,
    },
}

impl TransportError {
    /// Static label for metrics.
    pub fn label(&self) -> Label {
        match self {
            TransportError::Connect { .. } => Label::Connect,
            TransportError::Handshake { .. } => Label::TlsHandshake,
            TransportError::NoAlpn { .. } => Label::NoAlpn,
            TransportError::Timeout { .. } => Label::ConnectTimeout,
            TransportError::H2 { .. } => Label::H2Handshake,
        }
    }
}

/// Accepts TLS on `tcp`; returns the stream and the verified peer identity.
pub async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    deadline: Duration,
) -> Result<(ServerTls, SpiffeId), TransportError> {
    let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let tls = match timeout(deadline, acceptor.accept(GlommioIo::new(tcp)).into_fallible()).await {
        Err(_) => return Err(TransportError::Timeout { addr }),
        Ok(Err((source, io))) => {
            linger(io).await;
            return Err(TransportError::Handshake { addr, source });
        }
        Ok(Ok(tls)) => tls,
    };
    let conn = tls.get_ref().1;
    if !tls::negotiated_h2(conn) {
        return Err(TransportError::NoAlpn { addr });
    }
    let id = tls::peer_identity(conn).ok_or_else(|| TransportError::Handshake {
        addr: addr.clone(),
        source: std::io::Error::other("no peer identity"),
    })?;
    Ok((tls, id))
}

/// How long a refused handshake's socket is read (and discarded) after the
/// alert, at most.
pub const LINGER: Duration = Duration::from_millis(500);
/// How many bytes a refused handshake's socket is read at most.
const LINGER_BYTES: usize = 64 << 10;

/// Closes a refused handshake's connection so the peer can read our
/// alert: a TLS 1.3 client has already sent its first data when we refuse
/// its certificate; closing with that data unread would answer with a
/// TCP reset, and the client's next write would fail with a broken pipe
/// before it reads why. So: FIN after the alert, then read and discard
/// until the peer closes, [`LINGER_BYTES`] or [`LINGER`]. Rejected:
/// SO_LINGER (it governs unsent data, not unread data).
async fn linger(mut io: GlommioIo) {
    use tokio::io::{AsyncRead, ReadBuf};
    let _ = io.get_ref().shutdown(std::net::Shutdown::Write).await;
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            let mut rb = ReadBuf::new(&mut buf);
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut io).poll_read(cx, &mut rb)).await {
                Ok(()) if !rb.filled().is_empty() => total += rb.filled().len(),
                _ => return,
            }
        }
    };
    let _ = timeout(LINGER, drain).await;
}

/// Resolves `host:port` without blocking the shard (DNS goes to a blocking
/// thread; literal addresses are parsed in place).
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let owned = addr.to_string();
    glommio::executor()
        .spawn_blocking(move || {
            use std::net::ToSocketAddrs;
            owned.to_socket_addrs().and_then(|mut a| {
                a.next().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
            })
        })
        .await
}

/// Dials `addr` and completes TLS; returns the stream and the server's
/// verified identity.
pub async fn connect_tls(
    cfg: &Arc<rustls::ClientConfig>,
    addr: &str,
    deadline: Duration,
) -> Result<(ClientTls, SpiffeId), TransportError> {
    let fut = async {
        let sa = resolve(addr).await.map_err(|source| TransportError::Connect { addr: addr.to_string(), source })?;
        let tcp = TcpStream::connect(sa)
            .await
            .map_err(|e| TransportError::Connect { addr: addr.to_string(), source: e.into() })?;
        let host = addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(addr);
        let tls = TlsConnector::from(cfg.clone())
            .connect(tls::server_name(host), GlommioIo::new(tcp))
            .await
            .map_err(|source| TransportError::Handshake { addr: addr.to_string(), source })?;
        let conn = tls.get_ref().1;
        if !tls::negotiated_h2(conn) {
            return Err(TransportError::NoAlpn { addr: addr.to_string() });
        }
        let id = tls::peer_identity(conn).ok_or_else(|| TransportError::Handshake {
            addr: addr.to_string(),
            source: std::io::Error::other("no peer identity"),
        })?;
        Ok((tls, id))
    };
    timeout(deadline, fut).await.map_err(|_| TransportError::Timeout { addr: addr.to_string() })?
}
