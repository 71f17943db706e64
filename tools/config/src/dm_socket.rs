//! The multiplexer's device-model socket, wired to the engine: device models in their own
//! processes connect (`ioreq-mux dm`, or anything speaking docs/dm-protocol.md), and their
//! DMOPs become engine [`Control`] messages.
//!
//! Policy comes from the configuration: a `kind = "process"` server may connect as its
//! `name`, only from its `uid` (default: the multiplexer's own), and may claim only what its
//! `owns` lists (the engine's [`Grant`]: a range claim must lie inside one granted range of
//! its kind, a position claim must be granted as is). A claim outside the grant is refused
//! with EPERM; the engine routes each access only to its owner, so a server never sees
//! another server's accesses. MSIs (INJECT_MSI) are outside the grant: any connected server
//! may inject one, as Xen lets any device model of the domain.
//!
//! The socket machinery (accept, SO_PEERCRED, descriptor passing, the request path) is
//! [`ioreq_server::oop`]; this module is the [`Host`] the listener calls.

use crate::{Config, Server, ServerKind};
use crossbeam_channel::RecvTimeoutError;
use ioreq_mux_engine::{Control, ControlSender, Grant};
use ioreq_server::oop::RemoteOptions;
use ioreq_server::oop::server::{DmListener, DmopError, Host, ServerOptions, ServerStatus};
use ioreq_server::oop::sys::PeerCred;
use ioreq_server::oop::wire::Code;
use ioreq_server::{Claim, DeviceModel};
use std::io;
use std::path::Path;
use std::time::Duration;
use tracing::warn;

/// Who may connect as a server, and what it may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    /// Required peer uid; `None`: the multiplexer's own uid.
    pub uid: Option<u32>,
    pub grant: Grant,
    /// The server's own deadline per request (`None`: the listener's default).
    pub deadline: Option<Duration>,
}

impl Policy {
    /// A process server's policy: its `owns` is its grant.
    pub fn from_server(s: &Server) -> Self {
        let mut grant = Grant {
            guest_memory: s.guest_memory,
            config_space: s.config_space,
            ..Grant::default()
        };
        for c in &s.claims {
            match c {
                Claim::Range(r) => grant.ranges.push(*r),
                Claim::Position(p) => grant.positions.push(p.clone()),
            }
        }
        Policy {
            name: s.name.clone(),
            uid: s.uid,
            grant,
            deadline: s.deadline,
        }
    }
}

/// The policies of every `kind = "process"` server of a configuration.
pub fn policies(cfg: &Config) -> Vec<Policy> {
    cfg.servers
        .iter()
        .filter(|s| s.kind == ServerKind::Process)
        .map(Policy::from_server)
        .collect()
}

/// The engine, as the listener sees it.
#[derive(Debug)]
pub struct EngineHost {
    control: ControlSender,
    policies: Vec<Policy>,
    nr_vcpus: u32,
    /// Longest wait for the engine to apply a control message (it does so at the start of
    /// every `poll`, so the serving loop must poll at least this often).
    timeout: Duration,
    own_uid: u32,
}

impl EngineHost {
    pub fn new(
        control: ControlSender,
        policies: Vec<Policy>,
        nr_vcpus: u32,
        timeout: Duration,
    ) -> Self {
        EngineHost {
            control,
            policies,
            nr_vcpus,
            timeout,
            own_uid: nix::unistd::geteuid().as_raw(),
        }
    }

    fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    fn engine_gone() -> DmopError {
        DmopError::new(Code::EIO, "the multiplexer's engine has stopped")
    }

    /// Sends the engine a DMOP and waits for its answer: a claim's or an MSI's error.
    fn engine_op<E>(
        &self,
        msg: impl FnOnce(crossbeam_channel::Sender<Result<(), E>>) -> Control,
        what: &str,
    ) -> Result<(), DmopError>
    where
        DmopError: From<E>,
    {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.control
            .send(msg(tx))
            .map_err(|_| Self::engine_gone())?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(DmopError::from),
            Err(RecvTimeoutError::Timeout) => Err(DmopError::new(
                Code::ETIMEDOUT,
                format!("the engine did not apply {what} within {:?}", self.timeout),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(Self::engine_gone()),
        }
    }
}

impl Host for EngineHost {
    fn admit(&self, name: &str, peer: &PeerCred) -> Result<(), DmopError> {
        let Some(p) = self.policy(name) else {
            return Err(DmopError::new(
                Code::ENOENT,
                format!("no server named '{name}' with kind = \"process\" in the configuration"),
            ));
        };
        let want = p.uid.unwrap_or(self.own_uid);
        if peer.uid != want {
            return Err(DmopError::new(
                Code::EACCES,
                format!(
                    "server '{name}' must run as uid {want}; pid {} runs as uid {}",
                    peer.pid, peer.uid
                ),
            ));
        }
        Ok(())
    }

    fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    fn add(&self, model: Box<dyn DeviceModel>) -> Result<u16, DmopError> {
        let name = model.name().to_string();
        let grant = self
            .policy(&name)
            .map(|p| p.grant.clone())
            .unwrap_or_default();
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.control
            .send(Control::Add {
                model,
                grant: Some(grant),
                reply: tx,
            })
            .map_err(|_| Self::engine_gone())?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(idx)) => Ok(idx),
            Ok(Err(e)) => Err(DmopError::new(Code::EIO, e)),
            Err(RecvTimeoutError::Timeout) => {
                // The engine may still add it later: remove it then, so nothing stays claimed
                // for a device model that was told it failed.
                let control = self.control.clone();
                let _ = std::thread::Builder::new()
                    .name("dm-late-add".into())
                    .spawn(move || {
                        if let Ok(Ok(idx)) = rx.recv() {
                            let _ = control.send(Control::Remove { model: idx });
                        }
                    });
                Err(DmopError::new(
                    Code::ETIMEDOUT,
                    format!("the engine did not add '{name}' within {:?}", self.timeout),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => Err(Self::engine_gone()),
        }
    }

    fn map(&self, id: u16, claim: Claim) -> Result<(), DmopError> {
        let what = claim.to_string();
        self.engine_op(
            |reply| Control::Map {
                model: id,
                claim,
                reply,
            },
            &what,
        )
    }

    fn unmap(&self, id: u16, claim: Claim) -> Result<(), DmopError> {
        let what = claim.to_string();
        self.engine_op(
            |reply| Control::Unmap {
                model: id,
                claim,
                reply,
            },
            &what,
        )
    }

    /// Not checked against the grant: an MSI claims nothing, and Xen lets any device model
    /// of the domain inject one.
    fn inject_msi(&self, id: u16, addr: u64, data: u32) -> Result<(), DmopError> {
        self.engine_op(
            |reply| Control::InjectMsi {
                model: id,
                addr,
                data,
                reply,
            },
            &format!("MSI {data:#x} to {addr:#x}"),
        )
    }

    fn remote_options(&self, name: &str, default: &RemoteOptions) -> RemoteOptions {
        let mut o = default.clone();
        if let Some(d) = self.policy(name).and_then(|p| p.deadline) {
            o.deadline = d;
        }
        o
    }

    fn remove(&self, id: u16) {
        if self.control.send(Control::Remove { model: id }).is_err() {
            warn!(
                model = id,
                "engine gone; cannot release the claims of a departed device model"
            );
        }
    }
}

/// The listening device-model socket of a running engine.
#[derive(Debug)]
pub struct DmSocket {
    listener: DmListener,
}

impl DmSocket {
    /// Listens on `path` for the servers `policies` allow, adding them to the engine behind
    /// `control` (from [`ioreq_mux_engine::Engine::control`]). `nr_vcpus` is the guest's.
    pub fn start(
        path: &Path,
        policies: Vec<Policy>,
        control: ControlSender,
        nr_vcpus: u32,
        opts: ServerOptions,
    ) -> io::Result<Self> {
        let host = EngineHost::new(control, policies, nr_vcpus, opts.op_timeout);
        let listener = DmListener::start(path, std::sync::Arc::new(host), opts)?;
        Ok(DmSocket { listener })
    }

    /// [`DmSocket::start`] with the process servers of a configuration.
    pub fn from_config(
        path: &Path,
        cfg: &Config,
        control: ControlSender,
        nr_vcpus: u32,
        opts: ServerOptions,
    ) -> io::Result<Self> {
        Self::start(path, policies(cfg), control, nr_vcpus, opts)
    }

    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// The connected device models.
    pub fn servers(&self) -> Vec<ServerStatus> {
        self.listener.servers()
    }

    /// Closes every connection (goodbye ESHUTDOWN; claims released through the engine) and
    /// the socket.
    pub fn stop(self) {
        self.listener.stop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ioreq_server::{IoRange, Position};

    #[test]
    fn process_servers_owns_is_their_grant() {
        let cfg = Config::parse(
            Path::new("t.toml"),
            r#"
[[server]]
name = "vgpu"
kind = "process"
uid = 1000
owns.bdf = ["00:05.0"]
owns.position = ["00:02.0/00.0"]
owns.mmio = ["0xfe000000+0x1000000"]

[[server]]
name = "chipset"
[server.function."00:00.0"]
vendor = 0x8086
device = 0x29c0
"#,
        )
        .unwrap();
        let p = policies(&cfg);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "vgpu");
        assert_eq!(p[0].uid, Some(1000));
        assert_eq!(
            p[0].grant.ranges,
            vec![
                IoRange::pci(ioreq_server::abi::pack_sbdf(0, 0, 5, 0)),
                IoRange::mmio(0xfe00_0000, 0x100_0000)
            ]
        );
        assert_eq!(
            p[0].grant.positions,
            vec![Position {
                segment: 0,
                root_bus: 0,
                path: vec![2 << 3, 0]
            }]
        );
    }

    #[test]
    fn admission_checks_name_and_uid() {
        let (tx, _rx) = ControlSender::detached().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let pol = |name: &str, uid| Policy {
            name: name.into(),
            uid,
            grant: Grant::default(),
            deadline: None,
        };
        let h = EngineHost::new(
            tx,
            vec![pol("a", None), pol("b", Some(me.wrapping_add(1)))],
            1,
            Duration::from_millis(10),
        );
        let peer = PeerCred {
            pid: 1,
            uid: me,
            gid: 0,
        };
        assert!(h.admit("a", &peer).is_ok());
        assert_eq!(h.admit("b", &peer).unwrap_err().code, Code::EACCES);
        assert_eq!(h.admit("c", &peer).unwrap_err().code, Code::ENOENT);
        // Nobody polls the engine: a claim times out with ETIMEDOUT, not a hang.
        let e = h.map(1, Claim::Range(IoRange::ports(1, 1))).unwrap_err();
        assert_eq!(e.code, Code::ETIMEDOUT);
    }

    /// An MSI becomes an engine control message for the server, whatever its grant; the
    /// engine's refusal comes back as its errno.
    #[test]
    fn an_msi_goes_to_the_engine() {
        use ioreq_server::{BackendError, MsiError};
        let (tx, rx) = ControlSender::detached().unwrap();
        let h = EngineHost::new(tx, vec![], 1, Duration::from_secs(5));
        let engine = std::thread::spawn(move || {
            let mut seen = vec![];
            for answer in [
                Ok(()),
                Err(MsiError::Unsupported { why: "no".into() }),
                Err(MsiError::Backend {
                    addr: 1,
                    data: 2,
                    source: BackendError::Disconnected,
                }),
                Err(MsiError::NoModel { index: 3 }),
            ] {
                match rx.recv().unwrap() {
                    Control::InjectMsi {
                        model,
                        addr,
                        data,
                        reply,
                    } => {
                        seen.push((model, addr, data));
                        reply.send(answer).unwrap();
                    }
                    other => panic!("{other:?}"),
                }
            }
            seen
        });
        assert_eq!(h.inject_msi(3, 0xfee0_0000, 0x41), Ok(()));
        let code = |r: Result<(), DmopError>| r.unwrap_err().code;
        assert_eq!(code(h.inject_msi(3, 1, 2)), Code::EOPNOTSUPP);
        assert_eq!(code(h.inject_msi(3, 1, 2)), Code::EIO);
        assert_eq!(code(h.inject_msi(3, 1, 2)), Code::ENOENT);
        assert_eq!(engine.join().unwrap()[0], (3, 0xfee0_0000, 0x41));
    }

    /// QEMU's entry of the front-of-QEMU configuration: guest memory and its own deadline
    /// reach the grant and the request path; other servers keep the listener's defaults.
    #[test]
    fn guest_memory_and_deadline_from_the_configuration() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../configs/xen-e2e-front.toml");
        let cfg = Config::load(&path).unwrap();
        let pols = policies(&cfg);
        let qemu = pols.iter().find(|p| p.name == "qemu").unwrap();
        assert!(qemu.grant.guest_memory);
        assert_eq!(qemu.deadline, Some(Duration::from_secs(300)));
        let ep = pols.iter().find(|p| p.name == "bridge-ep").unwrap();
        assert!(!ep.grant.guest_memory);
        let (tx, _rx) = ControlSender::detached().unwrap();
        let h = EngineHost::new(tx, pols, 2, Duration::from_millis(10));
        let default = RemoteOptions::default();
        assert_eq!(
            h.remote_options("qemu", &default).deadline,
            Duration::from_secs(300)
        );
        assert_eq!(h.remote_options("bridge-ep", &default), default);
    }
}
