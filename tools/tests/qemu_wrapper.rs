//! The xl wrapper `contrib/xen/ioreq-mux-qemu`, run with stand-ins for `ioreq-mux` and QEMU
//! (shell scripts that record how they were called): it must start the multiplexer for the
//! domain libxl names, wait until it listens, and exec QEMU with every argument unchanged and
//! the preload library; or fail before QEMU runs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wrapper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/xen/ioreq-mux-qemu")
}

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ioreq-mux-wrapper-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("preload.so"), b"").unwrap();
        fs::write(dir.join("etc/qemu.toml"), b"# default\n").unwrap();
        // QEMU stand-in: records its arguments and the environment the preload needs.
        script(
            &dir.join("qemu"),
            &format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > {d}/qemu.args\n\
                 echo \"$LD_PRELOAD|$IOREQ_MUX_SOCKET|$IOREQ_MUX_SERVER\" > {d}/qemu.env\n",
                d = dir.display()
            ),
        );
        Fixture { dir }
    }

    /// An `ioreq-mux` stand-in running `body` (its arguments are recorded first).
    fn mux(&self, body: &str) {
        script(
            &self.dir.join("ioreq-mux"),
            &format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > {d}/mux.args\n{body}\n",
                d = self.dir.display()
            ),
        );
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = &self.dir;
        Command::new("sh")
            .arg(wrapper())
            .args(args)
            .env("IOREQ_MUX", d.join("ioreq-mux"))
            .env("IOREQ_MUX_QEMU", d.join("qemu"))
            .env("IOREQ_MUX_PRELOAD", d.join("preload.so"))
            .env("IOREQ_MUX_RUNDIR", d.join("run"))
            .env("IOREQ_MUX_LOGDIR", d.join("log"))
            .env("IOREQ_MUX_CONFIG", d.join("etc/qemu.toml"))
            .env("IOREQ_MUX_START_TIMEOUT", "5")
            .env_remove("LD_PRELOAD")
            .output()
            .unwrap()
    }

    fn read(&self, f: &str) -> String {
        fs::read_to_string(self.dir.join(f)).unwrap_or_default()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

const QEMU_ARGS: &[&str] = &[
    "-xen-domid",
    "7",
    "-chardev",
    "socket,id=libxl-cmd,path=/run/xen/qmp-libxl-7,server=on,wait=off",
    "-name",
    "guest one",
    "-machine",
    "xenfv,suppress-vmdesc=on",
];

#[test]
fn starts_the_multiplexer_then_execs_qemu_with_the_preload() {
    let f = Fixture::new("ok");
    // Ready after a moment, then stays up like the real one.
    f.mux("sleep 0.3; echo 'INFO ioreq_mux::serve: listening for device models'; sleep 5");
    let out = f.run(QEMU_ARGS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = f.dir.display();
    assert_eq!(
        f.read("mux.args").lines().collect::<Vec<_>>(),
        [
            "serve",
            "--domid",
            "7",
            "--config",
            &format!("{d}/etc/qemu.toml"),
            "--claim",
            "all",
            "--dm-socket",
            &format!("{d}/run/7.sock"),
            "--log-level",
            "info"
        ]
    );
    assert_eq!(f.read("qemu.args").lines().collect::<Vec<_>>(), QEMU_ARGS);
    assert_eq!(
        f.read("qemu.env").trim(),
        format!("{d}/preload.so|{d}/run/7.sock|qemu")
    );
    assert!(
        f.read("log/ioreq-mux-7.log")
            .contains("listening for device models")
    );
    let pid: i32 = f.read("run/7.pid").trim().parse().unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
}

#[test]
fn a_multiplexer_that_fails_keeps_qemu_from_starting() {
    let f = Fixture::new("fail");
    f.mux("echo 'ERROR ioreq_mux::serve: domain 7 does not exist'; exit 4");
    let out = f.run(QEMU_ARGS);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ioreq-mux exited before it was ready"),
        "{err}"
    );
    assert!(err.contains("domain 7 does not exist"), "{err}");
    assert!(!f.dir.join("qemu.args").exists(), "QEMU ran");
}

#[test]
fn no_domain_id_is_an_error() {
    let f = Fixture::new("nodom");
    f.mux("exit 0");
    let out = f.run(&["-machine", "xenfv"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no -xen-domid"));
    assert!(!f.dir.join("mux.args").exists());
    assert!(!f.dir.join("qemu.args").exists());
}
