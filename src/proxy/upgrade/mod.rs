//! The upgrade socket: how a running proxy hands its listening sockets to
//! a successor (restart or upgrade in place) and takes `ringpeer proxy …
//! drain`, as pingora's graceful upgrade does.
//!
//! Protocol (a Unix stream socket, one request per connection, lines):
//! - `HANDOVER <build>`: the predecessor stops writing to the backend (the
//!   successor owns the proxy id from now on), then sends one message: a
//!   JSON [`Header`] line with the listening sockets attached
//!   (`SCM_RIGHTS`). The successor answers `TAKEN`; only then does the
//!   predecessor drain ([`Drain::handed_over`]). Without `TAKEN` within
//!   [`TAKEN_WAIT`] it resumes as if nothing happened.
//! - `DRAIN`: the proxy leaves the fleet now; one line answers.
//!
//! Invariants:
//! - The sockets handed over are the very sockets the predecessor listens
//!   on (duplicated descriptors), so connections queued in their backlogs
//!   are accepted by the successor: none is refused or reset.
//!   Alternative rejected: the successor binding its own `SO_REUSEPORT`
//!   sockets and the predecessor closing its own; Linux resets the
//!   connections queued on a closed listener (unless the system-wide
//!   `tcp_migrate_req` is set), and new ones are spread over both
//!   processes until then.
//! - Only a process of the same user may connect (checked with
//!   `SO_PEERCRED`); the socket file is created mode 0600.
//! - A predecessor never unlinks the path once it handed over (the
//!   successor serves it); at a plain exit it unlinks only its own file.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::control::Commands;
use super::drain::{Drain, Phase};
use super::Listeners;
use crate::runtime::{build_version, Shutdown};

/// How long a predecessor waits for the successor's `TAKEN`.
pub const TAKEN_WAIT: Duration = Duration::from_secs(10);
/// Most listening sockets handed over (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 200;
/// How often the server thread checks whether the proxy stopped.
const POLL: Duration = Duration::from_millis(50);

/// What the predecessor sends with the sockets: which shard slots carry a
/// socket (in this order: client, tunnel, peer, admin).
#[derive(serde::Serialize, serde::Deserialize, Debug, Default)]
pub struct Header {
    /// The predecessor's build, or the reason it refused.
    pub build: String,
    /// Set when the handover is refused.
    pub error: Option<String>,
    /// Client listeners present, by shard.
    pub client: Vec<bool>,
    /// Tunnel listeners present, by shard.
    pub tunnel: Vec<bool>,
    /// Peer listeners present, by shard.
    pub peer: Vec<bool>,
    /// Whether an admin listener follows.
    pub admin: bool,
}

/// Duplicates of a proxy's listening sockets, kept to hand over.
pub struct Spare {
    header: Header,
    fds: Vec<OwnedFd>,
}

impl Spare {
    /// Duplicates every listener of `l`.
    pub fn of(l: &Listeners) -> std::io::Result<Spare> {
        let mut fds = Vec::new();
        let mut take = |v: &[Option<TcpListener>]| -> std::io::Result<Vec<bool>> {
            v.iter()
                .map(|s| match s {
                    Some(s) => {
                        fds.push(OwnedFd::from(s.try_clone()?));
                        Ok(true)
                    }
                    None => Ok(false),
                })
                .collect()
        };
        let client = take(&l.client)?;
        let tunnel = take(&l.tunnel)?;
        let peer = take(&l.peer)?;
        let admin = match &l.admin {
            Some(a) => {
                fds.push(OwnedFd::from(a.try_clone()?));
                true
            }
            None => false,
        };
        let header = Header { build: build_version().to_string(), error: None, client, tunnel, peer, admin };
        Ok(Spare { header, fds })
    }
}

/// The successor's side: takes the listeners of the proxy serving `path`.
/// `Ok(None)` when none does (nothing there, or a stale file).
pub fn take_over(path: &Path) -> anyhow::Result<Option<(Listeners, String)>> {
    let s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("upgrade socket {}", path.display())),
    };
    s.set_read_timeout(Some(TAKEN_WAIT))?;
    s.set_write_timeout(Some(TAKEN_WAIT))?;
    (&s).write_all(format!("HANDOVER {}\n", build_version()).as_bytes())?;
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .with_context(|| format!("upgrade socket {}: receiving the listeners", path.display()))?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs() {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process; nothing else owns them.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    let line = buf[..n].split(|b| *b == b'\n').next().unwrap_or_default();
    let h: Header = serde_json::from_slice(line)
        .with_context(|| format!("upgrade socket {}: the running proxy sent no valid header", path.display()))?;
    if let Some(e) = h.error {
        bail!("the running proxy refused the handover: {e}");
    }
    let want = [&h.client, &h.tunnel, &h.peer].iter().map(|v| v.iter().filter(|b| **b).count()).sum::<usize>()
        + usize::from(h.admin);
    if fds.len() != want {
        bail!("upgrade socket {}: expected {want} listening sockets, got {}", path.display(), fds.len());
    }
    let mut it = fds.into_iter();
    let mut next = |present: &[bool]| -> anyhow::Result<Vec<Option<TcpListener>>> {
        present
            .iter()
            .map(|p| {
                if !p {
                    return Ok(None);
                }
                let fd = it.next().expect("counted above");
                let l = TcpListener::from(fd);
                if !is_listening(&l) {
                    bail!("a handed-over descriptor is not a listening TCP socket");
                }
                Ok(Some(l))
            })
            .collect()
    };
    let client = next(&h.client)?;
    let tunnel = next(&h.tunnel)?;
    let peer = next(&h.peer)?;
    let admin = if h.admin { next(&[true])?.pop().flatten() } else { None };
    (&s).write_all(b"TAKEN\n")?;
    Ok(Some((Listeners { client, tunnel, peer, admin }, h.build)))
}

fn is_listening(l: &TcpListener) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a correctly sized out-parameter.
    let r = unsafe {
        libc::getsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && v == 1 && l.local_addr().is_ok()
}

/// The listeners of a proxy about to start on `cfg`: taken over from the
/// proxy serving the upgrade socket when one does (with its build), else
/// freshly bound.
pub fn acquire(cfg: &crate::config::ProxyConfig) -> anyhow::Result<(Listeners, Option<String>)> {
    if let Some(path) = cfg.upgrade_socket_path() {
        if let Some((l, build)) = take_over(&path)? {
            let n = l.client.len().max(l.tunnel.len());
            if n != cfg.shard_count() {
                tracing::warn!(
                    predecessor = n,
                    configured = cfg.shard_count(),
                    "running the predecessor's shard count (one per handed-over listener); \
                     to change it, stop this proxy and start it without a predecessor"
                );
            }
            return Ok((l, Some(build)));
        }
    }
    Ok((Listeners::bind(cfg)?, None))
}

/// `ringpeer proxy … drain`: asks the proxy serving `path` to leave the
/// fleet now; returns its answer.
pub fn request_leave(path: &Path) -> anyhow::Result<String> {
    let s = UnixStream::connect(path).with_context(|| {
        format!("no proxy answers on its upgrade socket {} (is it running with this config?)", path.display())
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    (&s).write_all(b"DRAIN\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Serves the upgrade socket at `path` until `stop`, a handover, or the
/// proxy leaving; `replace` unlinks an existing file first (this process
/// just took over from the one that served it).
pub fn serve(
    path: PathBuf,
    spare: Spare,
    drain: Drain,
    commands: Commands,
    stop: Shutdown,
    replace: bool,
) -> anyhow::Result<JoinHandle<()>> {
    if path.exists() {
        if !replace && UnixStream::connect(&path).is_ok() {
            bail!(
                "another proxy serves the upgrade socket {}; set upgrade_socket to a path of its own",
                path.display()
            );
        }
        let _ = std::fs::remove_file(&path);
    }
    let l = UnixListener::bind(&path).with_context(|| format!("cannot create upgrade socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let ino = std::fs::metadata(&path)?.ino();
    l.set_nonblocking(true)?;
    let t = std::thread::Builder::new().name("upgrade".into()).spawn(move || {
        let mut spare = Some(spare);
        while !stop.is_triggered() && drain.phase() != Phase::Successor && drain.phase() != Phase::Leaving {
            match l.accept() {
                Ok((s, _)) => answer(s, &mut spare, &drain, &commands),
                Err(_) => std::thread::sleep(POLL),
            }
        }
        // Leaving or stopped: drop the duplicates, so listeners the shards
        // closed stop listening. After a handover the path is the
        // successor's; otherwise remove our own file.
        drop(spare);
        if drain.phase() != Phase::Successor && std::fs::metadata(&path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
    })?;
    Ok(t)
}

fn same_user(s: &UnixStream) -> bool {
    let Ok(c) = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials) else { return false };
    // SAFETY: geteuid has no preconditions.
    c.uid() == unsafe { libc::geteuid() }
}

fn answer(s: UnixStream, spare: &mut Option<Spare>, drain: &Drain, commands: &Commands) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new(&s).read_line(&mut line).is_err() {
        return;
    }
    let reply = |m: &str| {
        let _ = (&s).write_all(format!("{m}\n").as_bytes());
    };
    if !same_user(&s) {
        tracing::warn!("upgrade socket: refused a connection from another user");
        return reply("refused: not the same user");
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("DRAIN"), _) => {
            if drain.leave() {
                tracing::info!("drain requested over the upgrade socket; leaving the fleet");
                reply("ok: leaving the fleet (agents move to other proxies, open streams finish)");
            } else {
                reply(&format!("ok: already draining ({:?})", drain.phase()));
            }
        }
        (Some("HANDOVER"), build) => hand_over(&s, build.unwrap_or("unknown"), spare, drain, commands),
        _ => reply("error: unknown request (HANDOVER <build> or DRAIN)"),
    }
}

fn hand_over(s: &UnixStream, build: &str, spare: &mut Option<Spare>, drain: &Drain, commands: &Commands) {
    let refuse = |why: String| {
        let h = Header { build: build_version().to_string(), error: Some(why), ..Default::default() };
        let _ = (&*s).write_all(format!("{}\n", serde_json::to_string(&h).unwrap_or_default()).as_bytes());
    };
    let Some(sp) = spare.as_ref() else { return refuse("the listeners were already handed over".into()) };
    if !drain.can_hand_over() {
        return refuse(format!("this proxy is {:?}", drain.phase()));
    }
    if sp.fds.len() > MAX_FDS {
        return refuse(format!("{} listening sockets exceed {MAX_FDS}", sp.fds.len()));
    }
    // Nothing this process writes may land after the successor's first
    // write: stop the writer before the successor gets the sockets.
    if !commands.retire(Duration::from_secs(2)) {
        commands.resume();
        return refuse("the control thread did not stop its backend writes in time".into());
    }
    let head = format!("{}\n", serde_json::to_string(&sp.header).unwrap_or_default());
    let raw: Vec<RawFd> = sp.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(head.as_bytes())],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    );
    let _ = s.set_read_timeout(Some(TAKEN_WAIT));
    let mut ack = String::new();
    let taken = sent.is_ok() && BufReader::new(s).read_line(&mut ack).is_ok() && ack.trim() == "TAKEN";
    if taken && drain.handed_over() {
        tracing::info!(
            successor = build,
            predecessor = build_version(),
            "a successor took over the listeners; draining"
        );
        *spare = None;
    } else {
        tracing::warn!(successor = build, ?sent, "handover did not complete; resuming");
        commands.resume();
    }
}

#[cfg(test)]
mod tests;
