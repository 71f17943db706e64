//! A stand-in for the multiplexer's engine behind the device-model socket: it keeps the
//! models the listener adds, their claims (checked against a grant) and where positions
//! resolve, and lets a test call a model the way the engine does.
#![allow(clippy::unwrap_used, dead_code)]

use ioreq_server::oop::RemoteOptions;
use ioreq_server::oop::server::{DmListener, DmopError, Host, ServerOptions};
use ioreq_server::oop::sys::PeerCred;
use ioreq_server::oop::wire::Code;
use ioreq_server::{
    Claim, ClaimError, DeviceModel, DmControl, DmError, IoRange, Ioreq, MsiError, Position,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct State {
    pub models: Vec<Option<Box<dyn DeviceModel>>>,
}

/// The fake engine.
#[derive(Default)]
pub struct FakeHost {
    pub state: Mutex<State>,
    /// Model names by index (apart from `state`, which is held while a model is called).
    pub names: Mutex<Vec<String>>,
    /// (model index, claim).
    pub claims: Mutex<Vec<(u16, Claim)>>,
    /// name -> (uid, granted claims: a range claim must lie inside one, a position equal).
    pub policy: HashMap<String, (u32, Vec<Claim>)>,
    pub located: Mutex<HashMap<Position, u32>>,
    pub removed: Mutex<Vec<u16>>,
    pub nr_vcpus: u32,
    /// (model index, address, data) of every MSI injected, in order.
    pub msis: Mutex<Vec<(u16, u64, u32)>>,
    /// Set: every MSI is refused with this error (the hypervisor cannot, say).
    pub msi_refusal: Mutex<Option<MsiError>>,
}

fn allows(grant: &[Claim], c: &Claim) -> bool {
    grant.iter().any(|g| match (g, c) {
        (Claim::Range(g), Claim::Range(r)) => {
            g.kind == r.kind && g.start <= r.start && r.end <= g.end
        }
        (a, b) => a == b,
    })
}

impl FakeHost {
    pub fn new(nr_vcpus: u32) -> Self {
        FakeHost {
            nr_vcpus,
            ..Default::default()
        }
    }

    pub fn allow(mut self, name: &str, uid: u32, grant: Vec<Claim>) -> Self {
        self.policy.insert(name.into(), (uid, grant));
        self
    }

    fn name_of(&self, id: u16) -> String {
        self.names.lock().unwrap()[usize::from(id)].clone()
    }

    fn do_map(&self, id: u16, claim: Claim) -> Result<(), ClaimError> {
        let name = self.name_of(id);
        let grant = &self.policy[&name].1;
        if !allows(grant, &claim) {
            return Err(ClaimError::NotGranted {
                claim: claim.clone(),
                requester: name,
            });
        }
        let mut c = self.claims.lock().unwrap();
        if let Some((o, _)) = c.iter().find(|(_, k)| *k == claim) {
            return Err(ClaimError::Conflict {
                claim: claim.clone(),
                requester: name,
                owner: format!("model {o}"),
            });
        }
        c.push((id, claim));
        Ok(())
    }

    fn do_unmap(&self, id: u16, claim: Claim) -> Result<(), ClaimError> {
        let mut c = self.claims.lock().unwrap();
        let Some(i) = c.iter().position(|(o, k)| *o == id && *k == claim) else {
            return Err(ClaimError::NotOwned {
                claim: claim.clone(),
                requester: format!("model {id}"),
            });
        };
        c.remove(i);
        Ok(())
    }

    fn do_inject_msi(&self, id: u16, addr: u64, data: u32) -> Result<(), MsiError> {
        if let Some(e) = self.msi_refusal.lock().unwrap().clone() {
            return Err(e);
        }
        self.msis.lock().unwrap().push((id, addr, data));
        Ok(())
    }

    /// What the engine does for one request: find the model and call it with a ctl.
    pub fn call(&self, id: u16, vcpu: u32, req: &Ioreq) -> Result<u64, DmError> {
        let mut st = self.state.lock().unwrap();
        let Some(m) = st.models.get_mut(usize::from(id)).and_then(Option::as_mut) else {
            return Err(DmError::Disconnected(format!("model {id}")));
        };
        let mut ctl = Ctl { host: self, id };
        m.handle(vcpu, req, &mut ctl)
    }

    pub fn owned(&self, id: u16) -> Vec<Claim> {
        self.claims
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, _)| *o == id)
            .map(|(_, c)| c.clone())
            .collect()
    }

    pub fn live(&self, id: u16) -> bool {
        self.state
            .lock()
            .unwrap()
            .models
            .get(usize::from(id))
            .is_some_and(Option::is_some)
    }
}

struct Ctl<'a> {
    host: &'a FakeHost,
    id: u16,
}

impl DmControl for Ctl<'_> {
    fn map(&mut self, claim: Claim) -> Result<(), ClaimError> {
        self.host.do_map(self.id, claim)
    }

    fn unmap(&mut self, claim: Claim) -> Result<(), ClaimError> {
        self.host.do_unmap(self.id, claim)
    }

    fn locate(&self, position: &Position) -> Option<u32> {
        self.host.located.lock().unwrap().get(position).copied()
    }

    fn inject_msi(&mut self, addr: u64, data: u32) -> Result<(), MsiError> {
        self.host.do_inject_msi(self.id, addr, data)
    }
}

impl Host for FakeHost {
    fn admit(&self, name: &str, peer: &PeerCred) -> Result<(), DmopError> {
        let Some((uid, _)) = self.policy.get(name) else {
            return Err(DmopError::new(Code::ENOENT, format!("no server '{name}'")));
        };
        if *uid != peer.uid {
            return Err(DmopError::new(
                Code::EACCES,
                format!("uid {} is not {uid}", peer.uid),
            ));
        }
        Ok(())
    }

    fn nr_vcpus(&self) -> u32 {
        self.nr_vcpus
    }

    fn add(&self, mut model: Box<dyn DeviceModel>) -> Result<u16, DmopError> {
        let id = {
            let mut st = self.state.lock().unwrap();
            self.names.lock().unwrap().push(model.name().to_string());
            st.models.push(None);
            (st.models.len() - 1) as u16
        };
        model
            .attach(&mut Ctl { host: self, id })
            .map_err(DmopError::from)?;
        self.state.lock().unwrap().models[usize::from(id)] = Some(model);
        Ok(id)
    }

    fn map(&self, id: u16, claim: Claim) -> Result<(), DmopError> {
        self.do_map(id, claim).map_err(DmopError::from)
    }

    fn unmap(&self, id: u16, claim: Claim) -> Result<(), DmopError> {
        self.do_unmap(id, claim).map_err(DmopError::from)
    }

    fn inject_msi(&self, id: u16, addr: u64, data: u32) -> Result<(), DmopError> {
        self.do_inject_msi(id, addr, data).map_err(DmopError::from)
    }

    fn remove(&self, id: u16) {
        self.claims.lock().unwrap().retain(|(o, _)| *o != id);
        self.removed.lock().unwrap().push(id);
        // Dropping the model needs the state lock, which a test thread calling the model
        // may hold: take it when it is free.
        let m = self
            .state
            .lock()
            .unwrap()
            .models
            .get_mut(usize::from(id))
            .and_then(Option::take);
        drop(m);
    }
}

pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A fresh socket path.
pub fn socket_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ioreq-oop-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("dm.sock")
}

/// Listener options: a request deadline of `deadline_ms`, and VGA memory writes
/// (0xa0000-0xbffff) through the buffered ring, as Xen buffers them.
pub fn opts(deadline_ms: u64) -> ServerOptions {
    ServerOptions {
        remote: RemoteOptions {
            deadline: Duration::from_millis(deadline_ms),
            buffered: vec![IoRange::mmio(0xa0000, 0x20000)],
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn start(host: Arc<FakeHost>, tag: &str, opts: ServerOptions) -> DmListener {
    let path = socket_path(tag);
    DmListener::start(&path, host, opts).unwrap()
}

/// Waits until `f` holds (or panics after 10 s).
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
