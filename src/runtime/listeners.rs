//! Listening sockets, bound before any shard starts so that "port in use"
//! is one clear error at start-up and tests can use port 0.
//!
//! Invariants: every shard gets its own `SO_REUSEPORT` socket on the same
//! port (the kernel spreads connections across shards); the port is first
//! probed without `SO_REUSEPORT`, because Linux would otherwise let a second
//! process silently join the group.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Why a listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {reason}")]
pub struct BindError {
    /// The address.
    pub addr: String,
    /// Which listener.
    pub what: &'static str,
    /// The OS reason.
    pub reason: std::io::Error,
}

fn socket_for(addr: SocketAddr, reuseport: bool) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Binds `n` `SO_REUSEPORT` listeners on `addr` (port 0 picks one port for
/// all of them).
pub fn bind_group(addr: SocketAddr, n: usize, what: &'static str) -> Result<Vec<TcpListener>, BindError> {
    let err = |reason| BindError { addr: addr.to_string(), what, reason };
    let probe = socket_for(addr, false).map_err(err)?;
    let bound = probe.local_addr().map_err(err)?.as_socket().expect("inet");
    drop(probe);
    (0..n.max(1))
        .map(|_| {
            let s = socket_for(bound, true).map_err(err)?;
            s.listen(4096).map_err(err)?;
            Ok(s.into())
        })
        .collect()
}

/// Parses a listen address, with a clear error.
pub fn parse_addr(s: &str, what: &'static str) -> Result<SocketAddr, BindError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| BindError {
        addr: s.to_string(),
        what,
        reason: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a host:port address"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_in_use_is_refused_even_with_reuseport() {
        let g = bind_group("127.0.0.1:0".parse().unwrap(), 2, "client").unwrap();
        let addr = g[0].local_addr().unwrap();
        assert_eq!(g[1].local_addr().unwrap(), addr);
        let e = bind_group(addr, 1, "client").unwrap_err();
        assert!(e.to_string().contains("cannot listen on"), "{e}");
    }
}
