//! `ioreq-mux serve --domid N --config FILE`: runs the multiplexer for one Xen HVM guest.
//!
//! Loads the configuration, builds the device models (`kind = "emulated"` servers in this
//! process; `kind = "process"` servers join later through the socket of `--dm-socket`, see
//! [`crate::dm_socket`]), creates an ioreq server for the domain
//! ([`crate::xen_backend::XenBackend`]), lets the engine claim what the models own, then
//! serves until a signal, the domain going away, or a test limit.
//!
//! Start the guest paused, start `serve`, unpause once it is ready (the `ready` log line, or
//! `READY=1` to systemd with `Type=notify`): see docs/xen.md.
//!
//! # Exit codes
//! | code | meaning |
//! |------|---------|
//! | 0 | clean shutdown: SIGINT/SIGTERM/SIGHUP, `--duration`/`--max-requests` reached, or the domain went away |
//! | 1 | any other failure (a Xen call failed, the engine could not start, a panic) |
//! | 2 | bad arguments or configuration (clap also exits 2 on bad arguments) |
//! | 3 | not a Xen host: libraries missing, no `/dev/xen/privcmd` or event-channel device, or built without the `xen` feature |
//! | 4 | the domain does not exist (or is not an HVM guest) |
//!
//! # Logs
//! As for every command ([`crate::logging`]): `tracing` on stderr, `info` unless
//! `--log-level`, `-v`/`-q` or `$IOREQ_MUX_LOG` say otherwise; JSON lines with
//! `--log-format json`. At `debug` (`--log-level debug`, `-vv`) every served access is one
//! line (`served config` with SBDF, register, size, direction and data). On exit: requests
//! served per model and the engine's counters.

use crate::config::{Config, ServerKind};
use crate::models::Placement;
use ioreq_server::DeviceModel;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing::{error, warn};

/// Exit codes of `serve` (see the module documentation).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_XEN: u8 = 3;
    pub const NO_DOMAIN: u8 = 4;
}

/// What the multiplexer claims from Xen.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ClaimMode {
    /// Beside QEMU: only the PCI functions, ports and MMIO the models own. Xen keeps sending
    /// everything else (other functions, 0xcf8-0xcff) to QEMU.
    #[default]
    Owned,
    /// In front of every device model: whole PCI segments and the configuration ports, as the
    /// engine asks. Other servers of the guest see no configuration access any more.
    All,
}

/// Arguments of `ioreq-mux serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Domain id of the HVM guest (create it paused: `xl create -p`).
    #[arg(long)]
    pub domid: u16,
    /// Configuration file (TOML, see docs/xen.md).
    #[arg(long)]
    pub config: PathBuf,
    /// What to claim from Xen.
    #[arg(long, value_enum, default_value_t = ClaimMode::Owned)]
    pub claim: ClaimMode,
    /// Do not ask Xen for a buffered ring (every access synchronous).
    #[arg(long)]
    pub no_bufioreq: bool,
    /// Stop cleanly after this many synchronous requests (tests).
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Stop cleanly after this long: `90`, `90s`, `500ms`, `5m` (tests).
    #[arg(long, value_name = "TIME", value_parser = crate::config::parse_duration)]
    pub duration: Option<Duration>,
    /// Listen here for device models in their own processes (`kind = "process"` servers of
    /// the configuration; docs/dm-protocol.md).
    #[arg(long, value_name = "PATH")]
    pub dm_socket: Option<PathBuf>,
    /// After setup, switch to this user (and its group; supplementary groups dropped). The Xen
    /// handles and the socket opened as root stay usable.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// After setup, chroot here (an empty directory is best).
    #[arg(long, value_name = "DIR")]
    pub chroot: Option<PathBuf>,
}

/// Tells systemd (`Type=notify`) about our state, if it started us.
#[cfg(feature = "xen")]
fn sd_notify(msg: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let r = UnixDatagram::unbound().and_then(|sock| {
        let bytes = path.as_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                let addr = SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr)
            }
            None => sock.send_to(msg.as_bytes(), &path),
        }
    });
    if let Err(e) = r {
        warn!(error = %e, "sd_notify({msg}) failed");
    }
}

/// Gives up what serving does not need, once every handle is open: no new privileges ever
/// (PR_SET_NO_NEW_PRIVS), optionally a chroot and another user. What stays: the descriptors
/// already open (privcmd, event channels, the mapped ioreq pages, the signalfd, the
/// device-model socket and its connections). See docs/security.md.
pub fn drop_privileges(user: Option<&str>, chroot: Option<&std::path::Path>) -> Result<(), String> {
    use nix::unistd::{Gid, User, chdir, chroot as do_chroot, setgid, setgroups, setuid};
    let target = match user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(|e| format!("user {name}: {e}"))?
                .ok_or_else(|| format!("user {name}: no such user"))?,
        ),
        None => None,
    };
    if let Some(dir) = chroot {
        do_chroot(dir).map_err(|e| format!("chroot {}: {e}", dir.display()))?;
        chdir("/").map_err(|e| format!("chdir / in the chroot: {e}"))?;
    }
    if let Some(u) = target {
        setgroups(&[] as &[Gid]).map_err(|e| format!("setgroups: {e}"))?;
        setgid(u.gid).map_err(|e| format!("setgid {}: {e}", u.gid))?;
        setuid(u.uid).map_err(|e| format!("setuid {}: {e}", u.uid))?;
        if setuid(nix::unistd::Uid::from_raw(0)).is_ok() && !u.uid.is_root() {
            return Err("still able to become root after setuid".into());
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    Ok(())
}

/// The models of the configuration that `serve` runs in process.
struct Models {
    models: Vec<Box<dyn DeviceModel>>,
}

fn build_models(cfg: &Config, claim: ClaimMode) -> Models {
    let mut models: Vec<Box<dyn DeviceModel>> = vec![];
    for s in &cfg.servers {
        match s.kind {
            ServerKind::Emulated => {
                for (p, _) in &s.functions {
                    match p {
                        Placement::Bdf(_) => {}
                        Placement::Position(pos) if claim == ClaimMode::Owned => warn!(
                            server = %s.name,
                            position = %pos,
                            "a function behind bridges cannot be served beside QEMU (the \
                             multiplexer never sees the bridges' bus numbers); it stays \
                             unreachable unless --claim all"
                        ),
                        Placement::Position(_) => {}
                    }
                }
                tracing::debug!(server = %s.name, functions = s.functions.len(), "emulated model");
                models.push(Box::new(s.emulated_model()));
            }
            ServerKind::Process => tracing::debug!(
                server = %s.name,
                "process server: joins through --dm-socket"
            ),
            ServerKind::Trace => error!(
                server = %s.name,
                "trace servers only answer in `replay`: skipped"
            ),
        }
    }
    Models { models }
}

/// Runs `ioreq-mux serve`.
pub fn run(args: &ServeArgs) -> ExitCode {
    ExitCode::from(run_inner(args))
}

fn run_inner(args: &ServeArgs) -> u8 {
    // Block the stop signals before anything could start a thread, and receive them through
    // a signalfd that the backend polls with the event channel: shutdown is immediate and
    // always goes through the cleanup (disable, unclaim, destroy).
    let mut mask = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(s);
    }
    let signals = match mask
        .thread_block()
        .and_then(|()| SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC))
    {
        Ok(fd) => fd,
        Err(e) => {
            error!("cannot set up signal handling: {e}");
            return exit::FAILURE;
        }
    };

    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return exit::USAGE;
        }
    };
    let models = build_models(&cfg, args.claim);
    let process = cfg.servers.iter().any(|s| s.kind == ServerKind::Process);
    if models.models.is_empty() && !(process && args.dm_socket.is_some()) {
        error!(
            config = %args.config.display(),
            "nothing to serve: the configuration has no server `serve` can run (kind = \"emulated\", or kind = \"process\" with --dm-socket)"
        );
        return exit::USAGE;
    }
    serve(args, &cfg, models, signals)
}

#[cfg(not(feature = "xen"))]
fn serve(_: &ServeArgs, _: &Config, models: Models, _: SignalFd) -> u8 {
    tracing::debug!(models = models.models.len(), "configuration checked");
    error!("not a Xen host: this ioreq-mux was built without Xen support (feature `xen` off)");
    exit::NOT_XEN
}

#[cfg(feature = "xen")]
fn serve(args: &ServeArgs, cfg: &Config, models: Models, signals: SignalFd) -> u8 {
    use std::time::Instant;
    let mut engine = match open_backend(args, cfg, &signals)
        .and_then(|(backend, engine_cfg)| start_engine(backend, models, &engine_cfg))
    {
        Ok(e) => e,
        Err(code) => return code,
    };
    log_ready(args, &engine);
    let dm_socket = match listen_for_models(args, cfg, &mut engine) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = drop_privileges(args.user.as_deref(), args.chroot.as_deref()) {
        error!("cannot drop privileges: {e}");
        return exit::FAILURE;
    }
    sd_notify("READY=1");
    let started = Instant::now();
    let (code, domain_gone) = serve_until_stopped(args, &mut engine, &signals);
    sd_notify("STOPPING=1");
    finish(&mut engine, domain_gone, started);
    if let Some(s) = dm_socket {
        s.stop();
    }
    // Dropping the engine drops the backend: unclaim and destroy the server.
    drop(engine);
    tracing::info!(exit_code = code, "stopped");
    code
}

#[cfg(feature = "xen")]
type XenEngine = crate::engine::Engine<crate::xen_backend::XenBackend>;

/// Creates the ioreq server for the domain with what `--claim` and `--no-bufioreq` ask, and
/// the engine configuration that goes with it. Err: the exit code.
#[cfg(feature = "xen")]
fn open_backend(
    args: &ServeArgs,
    cfg: &Config,
    signals: &SignalFd,
) -> Result<(crate::xen_backend::XenBackend, crate::engine::EngineConfig), u8> {
    use crate::xen_backend::{OpenError, XenBackend, XenBackendOptions};
    use std::os::fd::AsFd;
    // The engine decides what to claim (PciClaims::Functions beside QEMU); the backend claims
    // what it is asked, but leaves 0xcf8-0xcff to QEMU beside it.
    let mut opts = XenBackendOptions::everything();
    let mut engine_cfg = cfg.engine.clone();
    if args.claim == ClaimMode::Owned {
        opts.config_ports = false;
        engine_cfg.pci_claims = crate::engine::PciClaims::Functions;
    }
    opts.buffered = !args.no_bufioreq;
    let mut backend = XenBackend::open(args.domid, opts).map_err(|e| {
        error!("{e}");
        match e {
            OpenError::NotXen(_) => exit::NOT_XEN,
            OpenError::NoDomain { .. } => exit::NO_DOMAIN,
            OpenError::TooManyVcpus { .. } | OpenError::Xen { .. } => exit::FAILURE,
        }
    })?;
    match signals.as_fd().try_clone_to_owned() {
        Ok(fd) => backend.add_wake_fd(fd),
        Err(e) => warn!(error = %e, "signals will be noticed within half a second only"),
    }
    Ok((backend, engine_cfg))
}

/// The engine over the backend, with the built-in models attached and their claims made.
#[cfg(feature = "xen")]
fn start_engine(
    backend: crate::xen_backend::XenBackend,
    models: Models,
    engine_cfg: &crate::engine::EngineConfig,
) -> Result<XenEngine, u8> {
    use crate::engine::{Engine, EngineError};
    use ioreq_server::ClaimError;
    let mut engine = Engine::new(backend, models.models, engine_cfg).map_err(|e| {
        error!("{e}");
        match e {
            EngineError::Attach {
                source: ClaimError::Backend { .. },
                ..
            }
            | EngineError::Backend(_)
            | EngineError::Doorbell(_)
            | EngineError::Window {
                hypervisor: true, ..
            } => exit::FAILURE,
            EngineError::Attach { .. } | EngineError::Window { .. } | EngineError::Port(_) => {
                exit::USAGE
            }
        }
    })?;
    // Device models' DMOPs outside a request wake the engine at once.
    match engine.control_wake_fd().try_clone_to_owned() {
        Ok(fd) => engine.backend_mut().add_wake_fd(fd),
        Err(e) => warn!(error = %e, "device models' claims will wait for the next guest access"),
    }
    Ok(engine)
}

/// The line the operator (and the e2e test) waits for before unpausing the guest.
#[cfg(feature = "xen")]
fn log_ready(args: &ServeArgs, engine: &XenEngine) {
    let strings =
        |v: &[ioreq_server::IoRange]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let claims = strings(&engine.backend().claims());
    let skipped = strings(engine.backend().skipped());
    let names: Vec<String> = engine.served().into_iter().map(|(n, _)| n).collect();
    tracing::info!(
        domid = args.domid,
        server = engine.backend().server_id(),
        models = ?names,
        claimed_from_xen = ?claims,
        left_to_others = ?skipped,
        chipset = %engine.chipset(),
        "ready: serving; unpause the guest now"
    );
}

/// With `--dm-socket`: the listener for the configuration's process servers.
#[cfg(feature = "xen")]
fn listen_for_models(
    args: &ServeArgs,
    cfg: &Config,
    engine: &mut XenEngine,
) -> Result<Option<crate::dm_socket::DmSocket>, u8> {
    let Some(path) = &args.dm_socket else {
        return Ok(None);
    };
    let vcpus = ioreq_server::Backend::nr_vcpus(engine.backend());
    match crate::dm_socket::DmSocket::from_config(
        path,
        cfg,
        engine.control(),
        vcpus,
        ioreq_server::oop::server::ServerOptions::default(),
    ) {
        Ok(s) => {
            tracing::info!(socket = %path.display(), "listening for device models");
            Ok(Some(s))
        }
        Err(e) => {
            error!(socket = %path.display(), "cannot listen for device models: {e}");
            Err(exit::FAILURE)
        }
    }
}

/// Serves until a signal, the domain going away, an error or a test limit; a panic in the
/// engine is an error too. Returns the exit code and whether the domain is gone.
#[cfg(feature = "xen")]
fn serve_until_stopped(args: &ServeArgs, engine: &mut XenEngine, signals: &SignalFd) -> (u8, bool) {
    let mut domain_gone = false;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve_loop(args, engine, signals, &mut domain_gone)
    }));
    let (code, why) = match outcome {
        Ok(Ok(why)) => (exit::OK, why),
        Ok(Err(why)) => (exit::FAILURE, why),
        Err(_) => (exit::FAILURE, "panic".to_string()),
    };
    if code == exit::OK {
        tracing::info!(reason = %why, "shutting down");
    } else {
        error!(reason = %why, "shutting down after an error");
    }
    (code, domain_gone)
}

/// The serving loop: Ok(why it stopped), or Err(what failed).
#[cfg(feature = "xen")]
fn serve_loop(
    args: &ServeArgs,
    engine: &mut XenEngine,
    signals: &SignalFd,
    domain_gone: &mut bool,
) -> Result<String, String> {
    use ioreq_server::BackendError;
    use std::time::Instant;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + d);
    let mut next_check = started + Duration::from_secs(1);
    loop {
        if let Some(why) = signal_received(signals) {
            return Ok(why);
        }
        let now = Instant::now();
        let mut timeout = Duration::from_millis(500);
        if let Some(d) = deadline {
            if now >= d {
                return Ok("--duration reached".to_string());
            }
            timeout = timeout.min(d - now);
        }
        match engine.poll(Some(timeout)) {
            Ok(_) => {}
            Err(BackendError::Disconnected) => {
                *domain_gone = true;
                return Ok(format!("domain {} is gone", args.domid));
            }
            Err(e) => return Err(format!("hypervisor: {e}")),
        }
        if args
            .max_requests
            .is_some_and(|max| engine.stats().requests >= max)
        {
            return Ok("--max-requests reached".to_string());
        }
        let now = Instant::now();
        if now >= next_check {
            next_check = now + Duration::from_secs(1);
            match engine.backend().alive() {
                Ok(true) => {}
                Ok(false) => {
                    *domain_gone = true;
                    return Ok(format!(
                        "domain {} is gone (its ioreq servers were destroyed)",
                        args.domid
                    ));
                }
                Err(e) => warn!(error = %e, "checking that the domain is alive"),
            }
        }
    }
}

/// The name of a signal that arrived, if one did.
#[cfg(feature = "xen")]
fn signal_received(signals: &SignalFd) -> Option<String> {
    match signals.read_signal() {
        Ok(Some(sig)) => {
            let name = Signal::try_from(sig.ssi_signo as i32).map_or("signal", |s| s.as_str());
            Some(format!("{name} received"))
        }
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "reading the signalfd");
            None
        }
    }
}

/// After the loop: unless the domain is gone, stop new requests and answer what Xen already
/// put in the slots; then log what was served.
#[cfg(feature = "xen")]
fn finish(engine: &mut XenEngine, domain_gone: bool, started: std::time::Instant) {
    if !domain_gone {
        if let Err(e) = engine.backend_mut().disable() {
            warn!(error = %e, "disabling the ioreq server");
        }
        for _ in 0..3 {
            if let Err(e) = engine.poll(Some(Duration::ZERO)) {
                warn!(error = %e, "serving the last requests");
                break;
            }
        }
    }
    for (model, requests) in engine.served() {
        tracing::info!(%model, requests, "served by model");
    }
    let s = engine.stats();
    let b = engine.backend().stats();
    tracing::info!(
        requests = s.requests,
        buffered = s.buffered,
        config = s.config_cf8 + s.config_ecam,
        pio = s.pio,
        mmio = s.mmio,
        broadcasts = s.broadcasts,
        master_aborts = s.master_aborts,
        malformed = s.malformed + b.malformed_answered,
        dm_errors = s.dm_errors,
        rep_ptr_requests = s.data_ptr_forwarded,
        config_ecam = s.config_ecam,
        beyond_config_space = s.beyond_config_space,
        rep_ptr_unserved = s.data_ptr_unsupported,
        completion_errors = s.completion_errors,
        msis = s.msis_injected,
        msi_errors = s.msi_errors,
        notifications = b.notifications,
        uptime = ?started.elapsed(),
        "summary"
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn arguments() {
        let c = Cli::try_parse_from(["x", "--domid", "3", "--config", "/etc/ioreq-mux/3.toml"])
            .unwrap();
        assert_eq!(c.serve.domid, 3);
        assert_eq!(c.serve.claim, ClaimMode::Owned);
        let c = Cli::try_parse_from([
            "x",
            "--domid",
            "1",
            "--config",
            "c",
            "--claim",
            "all",
            "--duration",
            "2s",
            "--max-requests",
            "10",
            "--no-bufioreq",
        ])
        .unwrap();
        assert_eq!(c.serve.claim, ClaimMode::All);
        assert_eq!(c.serve.duration, Some(Duration::from_secs(2)));
        assert!(
            Cli::try_parse_from(["x", "--config", "c"]).is_err(),
            "--domid is required"
        );
    }

    #[test]
    fn privilege_drop_errors_are_clear() {
        let e = drop_privileges(Some("no-such-user-ioreq-mux"), None).unwrap_err();
        assert!(e.contains("no-such-user-ioreq-mux"), "{e}");
        // In a child thread's process this would be permanent; PR_SET_NO_NEW_PRIVS only
        // restricts future execs, so setting it in the test process is harmless.
        drop_privileges(None, None).unwrap();
        assert!(nix::sys::prctl::get_no_new_privs().unwrap());
    }

    #[test]
    fn models_from_the_e2e_config() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/xen-e2e.toml");
        let cfg = Config::load(&path).unwrap();
        let m = build_models(&cfg, ClaimMode::Owned);
        assert_eq!(m.models.len(), 1);
    }

    #[test]
    fn bad_config_is_exit_2_and_nothing_to_serve_too() {
        let dir = std::env::temp_dir().join(format!("ioreq-mux-serve-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[server]]\nname = \"a\"\nownz = 1\n").unwrap();
        let args = |p: &std::path::Path| ServeArgs {
            domid: 1,
            config: p.to_path_buf(),
            claim: ClaimMode::Owned,
            no_bufioreq: false,
            max_requests: None,
            duration: None,
            dm_socket: None,
            user: None,
            chroot: None,
        };
        assert_eq!(run_inner(&args(&bad)), exit::USAGE);
        let process_only = dir.join("process.toml");
        std::fs::write(
            &process_only,
            "[[server]]\nname = \"qemu\"\nkind = \"process\"\n",
        )
        .unwrap();
        assert_eq!(run_inner(&args(&process_only)), exit::USAGE);
        assert_eq!(run_inner(&args(&dir.join("missing.toml"))), exit::USAGE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// On this (non-Xen) machine a valid configuration ends with "not a Xen host".
    #[test]
    fn not_a_xen_host_is_exit_3() {
        if std::path::Path::new("/dev/xen/privcmd").exists() {
            return;
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/xen-e2e.toml");
        let args = ServeArgs {
            domid: 1,
            config: path,
            claim: ClaimMode::Owned,
            no_bufioreq: false,
            max_requests: None,
            duration: None,
            dm_socket: None,
            user: None,
            chroot: None,
        };
        assert_eq!(run_inner(&args), exit::NOT_XEN);
    }
}
