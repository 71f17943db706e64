//! Safe wrappers for what the protocol needs from the kernel: SOCK_SEQPACKET Unix sockets
//! with descriptor passing and peer credentials, eventfds and `poll`.

use super::shm::adopt;
use super::wire::MAX_MESSAGE;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, Shutdown, SockFlag,
    SockType, UnixAddr, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, shutdown,
    socket, socketpair, sockopt,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most descriptors one message may carry (Linux's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

pub(crate) fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Who is at the other end of a socket (SO_PEERCRED, taken when it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// A connected SOCK_SEQPACKET Unix socket: one `send` is one message.
#[derive(Debug)]
pub struct SeqPacket {
    fd: OwnedFd,
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// Bytes in `buf` (0: the peer closed the connection).
    pub len: usize,
    /// Descriptors that came with it (owned: dropping them closes them).
    pub fds: Vec<OwnedFd>,
    /// The message or its descriptors did not fit and were cut.
    pub truncated: bool,
}

/// A new close-on-exec SOCK_SEQPACKET socket and the address of `path`, to connect or bind.
fn unix_seqpacket(path: &Path) -> io::Result<(OwnedFd, UnixAddr)> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(errno)?;
    let addr = UnixAddr::new(path).map_err(errno)?;
    Ok((fd, addr))
}

impl SeqPacket {
    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let (fd, addr) = unix_seqpacket(path)?;
        connect(fd.as_raw_fd(), &addr).map_err(errno)?;
        Ok(SeqPacket { fd })
    }

    /// A connected pair (tests).
    pub fn pair() -> io::Result<(Self, Self)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(errno)?;
        Ok((SeqPacket { fd: a }, SeqPacket { fd: b }))
    }

    /// The credentials the kernel recorded for the peer.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        let c = getsockopt(&self.fd, sockopt::PeerCredentials).map_err(errno)?;
        Ok(PeerCred {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }

    fn send_flags(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], flags: MsgFlags) -> io::Result<()> {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} descriptors in one message (at most {MAX_FDS})",
                    fds.len()
                ),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let iov = [IoSlice::new(bytes)];
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                flags | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "sent {n} of {} bytes of a message",
                        bytes.len()
                    )));
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// Sends one message with `fds` attached (blocking while the peer's queue is full).
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_flags(bytes, fds, MsgFlags::empty())
    }

    /// Sends one message without blocking: `WouldBlock` if the peer's queue is full.
    pub fn send_now(&self, bytes: &[u8]) -> io::Result<()> {
        self.send_flags(bytes, &[], MsgFlags::MSG_DONTWAIT)
    }

    /// Receives one message into `buf` (at least [`MAX_MESSAGE`] + 1 bytes, so an oversized
    /// message is seen as truncated). With `wait` false, `WouldBlock` when nothing is queued.
    pub fn recv(&self, buf: &mut [u8], wait: bool) -> io::Result<Received> {
        debug_assert!(buf.len() > MAX_MESSAGE);
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
        if !wait {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        loop {
            let mut iov = [IoSliceMut::new(buf)];
            let r = recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cmsg), flags);
            let msg = match r {
                Ok(m) => m,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(errno(e)),
            };
            let mut fds = vec![];
            let mut truncated =
                msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC);
            match msg.cmsgs() {
                Ok(it) => {
                    for c in it {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // Each received descriptor is new in this process and owned by
                            // nobody else: adopt every one exactly once.
                            fds.extend(raw.into_iter().map(adopt));
                        }
                    }
                }
                Err(_) => truncated = true,
            }
            return Ok(Received {
                len: msg.bytes,
                fds,
                truncated,
            });
        }
    }

    /// Ends the connection both ways: the peer's and our own pending `recv` return 0.
    pub fn shutdown(&self) {
        let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Both);
    }
}

impl AsFd for SeqPacket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A listening SOCK_SEQPACKET socket bound to a path; the path is removed on drop.
#[derive(Debug)]
pub struct SeqListener {
    fd: OwnedFd,
    path: PathBuf,
}

impl SeqListener {
    /// Binds `path` with permissions `mode` (set before `listen`, so nobody can connect while
    /// the file still has the umask's permissions). A stale socket file at `path` is removed;
    /// any other kind of file is an error.
    pub fn bind(path: &Path, mode: u32) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (fd, addr) = unix_seqpacket(path)?;
        bind(fd.as_raw_fd(), &addr).map_err(errno)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        listen(&fd, Backlog::new(16).map_err(errno)?).map_err(errno)?;
        Ok(SeqListener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Accepts one connection (blocks; use [`wait_readable`] first to bound the wait).
    pub fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // A new descriptor from the kernel, owned by nobody yet.
                Ok(raw) => return Ok(SeqPacket { fd: adopt(raw) }),
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(e) => return Err(errno(e)),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for SeqListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SeqListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A non-blocking eventfd used as a doorbell: `ring` adds one, `clear` takes the count.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(errno)?;
        Ok(Doorbell { fd: e.into() })
    }

    /// An eventfd received from the other side.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Doorbell { fd }
    }

    /// Adds one to the counter (wakes a poller). A full counter (2^64 - 2) already wakes.
    pub fn ring(&self) -> io::Result<()> {
        match nix::unistd::write(&self.fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(Errno::EAGAIN) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    /// Reads and resets the counter; 0 if it was not rung. Works whether or not the
    /// descriptor is non-blocking only if it is: both sides create and keep it non-blocking.
    pub fn clear(&self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        match nix::unistd::read(self.fd.as_raw_fd(), &mut b) {
            Ok(8) => Ok(u64::from_ne_bytes(b)),
            Ok(n) => Err(io::Error::other(format!("eventfd read returned {n} bytes"))),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(errno(e)),
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// What `wait_readable` saw on one descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ready {
    pub readable: bool,
    /// Hang-up or error (a closed peer).
    pub hangup: bool,
}

fn poll_timeout(timeout: Option<Duration>) -> PollTimeout {
    match timeout {
        None => PollTimeout::NONE,
        // Round up so a short positive wait does not become a busy 0 ms poll.
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128);
            PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// How a descriptor in a [`Waiter`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Whenever it is readable (a socket: reported until everything queued is read).
    Level,
    /// Once per change: for an eventfd, once per ring, without reading the eventfd. Its
    /// count is then never read back and only grows; a write would fail only at 2^64 - 2
    /// (centuries of rings), which [`Doorbell::ring`] treats as rung.
    Edge,
}

/// A set of descriptors registered once and waited on with one `epoll_wait`: unlike `poll`,
/// which registers with every descriptor and checks each one again at every call, and unlike
/// a level-triggered eventfd, which must be read (a second system call) before the next wait.
#[derive(Debug)]
pub struct Waiter {
    ep: Epoll,
}

impl Waiter {
    pub fn new() -> io::Result<Self> {
        Ok(Waiter {
            ep: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(errno)?,
        })
    }

    /// Adds `fd`, reported with `token`. The descriptor must stay open while it is in the set
    /// (the kernel drops it from the set when its last copy closes).
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, trigger: Trigger) -> io::Result<()> {
        let mut flags = EpollFlags::EPOLLIN;
        if trigger == Trigger::Edge {
            flags |= EpollFlags::EPOLLET;
        }
        self.ep
            .add(fd, EpollEvent::new(flags, token))
            .map_err(errno)
    }

    /// Waits until a descriptor in the set reports or `timeout` passes (`None`: forever), and
    /// calls `f` with the token and state of each one that did (none on timeout or signal).
    pub fn wait(&self, timeout: Option<Duration>, mut f: impl FnMut(u64, Ready)) -> io::Result<()> {
        let mut events = [EpollEvent::empty(); 16];
        let n = match self.ep.wait(&mut events, poll_timeout(timeout)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(errno(e)),
        };
        for e in events.iter().take(n) {
            let fl = e.events();
            f(
                e.data(),
                Ready {
                    readable: fl.contains(EpollFlags::EPOLLIN),
                    hangup: fl.intersects(
                        EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR | EpollFlags::EPOLLRDHUP,
                    ),
                },
            );
        }
        Ok(())
    }
}

/// Waits until one of `fds` is readable or hung up, or `timeout` passes (`None`: forever).
/// Returns one entry per descriptor; all false on timeout.
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<Ready>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    match poll(&mut pfds, poll_timeout(timeout)) {
        Ok(_) => {}
        Err(Errno::EINTR) => return Ok(vec![Ready::default(); fds.len()]),
        Err(e) => return Err(errno(e)),
    }
    Ok(pfds
        .iter()
        .map(|p| {
            let r = p.revents().unwrap_or(PollFlags::empty());
            Ready {
                readable: r.contains(PollFlags::POLLIN),
                hangup: r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn descriptors_travel_and_eof_is_zero() {
        let (a, b) = SeqPacket::pair().unwrap();
        let bell = Doorbell::new().unwrap();
        a.send(b"hello", &[bell.as_fd()]).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let r = b.recv(&mut buf, true).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 1);
        assert!(!r.truncated);
        let theirs = Doorbell::from_fd(r.fds.into_iter().next().unwrap());
        theirs.ring().unwrap();
        theirs.ring().unwrap();
        assert_eq!(bell.clear().unwrap(), 2);
        assert_eq!(bell.clear().unwrap(), 0);
        assert_eq!(
            b.recv(&mut buf, false).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let cred = a.peer_cred().unwrap();
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        drop(a);
        assert_eq!(b.recv(&mut buf, true).unwrap().len, 0);
    }

    #[test]
    fn oversized_message_is_seen_truncated() {
        let (a, b) = SeqPacket::pair().unwrap();
        a.send(&vec![7u8; MAX_MESSAGE + 100], &[]).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let r = b.recv(&mut buf, true).unwrap();
        assert!(r.truncated);
    }

    #[test]
    fn poll_sees_doorbell_and_hangup() {
        let bell = Doorbell::new().unwrap();
        let (a, b) = SeqPacket::pair().unwrap();
        let r = wait_readable(&[bell.as_fd(), b.as_fd()], Some(Duration::from_millis(1))).unwrap();
        assert_eq!(r, vec![Ready::default(); 2]);
        bell.ring().unwrap();
        drop(a);
        let r = wait_readable(&[bell.as_fd(), b.as_fd()], None).unwrap();
        assert!(r[0].readable);
        assert!(r[1].hangup);
    }

    #[test]
    fn waiter_reports_each_ring_once_and_a_socket_until_read() {
        let bell = Doorbell::new().unwrap();
        let (a, b) = SeqPacket::pair().unwrap();
        let w = Waiter::new().unwrap();
        w.add(bell.as_fd(), 7, Trigger::Edge).unwrap();
        w.add(b.as_fd(), 9, Trigger::Level).unwrap();
        let got = |w: &Waiter| {
            let mut v = vec![];
            w.wait(Some(Duration::from_millis(1)), |t, r| v.push((t, r)))
                .unwrap();
            v.sort_by_key(|(t, _)| *t);
            v
        };
        assert!(got(&w).is_empty());
        bell.ring().unwrap();
        let ready = Ready {
            readable: true,
            hangup: false,
        };
        assert_eq!(got(&w), vec![(7, ready)]);
        assert!(
            got(&w).is_empty(),
            "an edge: reported once, the count left alone"
        );
        bell.ring().unwrap();
        assert_eq!(got(&w), vec![(7, ready)], "each ring is a new edge");
        assert_eq!(bell.clear().unwrap(), 2);
        a.send(b"x", &[]).unwrap();
        assert_eq!(got(&w), vec![(9, ready)]);
        assert_eq!(got(&w), vec![(9, ready)], "a level: until read");
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        b.recv(&mut buf, false).unwrap();
        assert!(got(&w).is_empty());
        drop(a);
        let v = got(&w);
        assert_eq!(v.len(), 1);
        assert!(v[0].1.hangup);
    }

    #[test]
    fn listener_mode_and_stale_socket() {
        let dir = std::env::temp_dir().join(format!("oop-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        let l = SeqListener::bind(&p, 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let c = SeqPacket::connect(&p).unwrap();
        let s = l.accept().unwrap();
        c.send(b"x", &[]).unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        assert_eq!(s.recv(&mut buf, true).unwrap().len, 1);
        std::mem::forget(l); // leave the socket file behind, as a crash would
        let _l2 = SeqListener::bind(&p, 0o600).unwrap();
        std::fs::write(dir.join("f"), b"").unwrap();
        assert!(SeqListener::bind(&dir.join("f"), 0o600).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
