//! The real processes the demo and the benchmarks start: `tiervec-cloud` and `tiervec-edge`
//! from the same build as this binary (and the WASM guest an edge may run), pinned to cores
//! with `taskset`, killed when their guard is dropped (however the run ends).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Builds the cloud and edge binaries when run under cargo (`cargo run` sets `CARGO`), so the
/// processes started are those of the current sources; otherwise they must exist already. The
/// testbed is named too (already built, so no work): cargo unifies features over the packages
/// of one command, and with it the dependencies compile as for `cargo run -p tiervec-testbed`
/// and the workspace's tests instead of a second time.
pub fn ensure_binaries() -> anyhow::Result<()> {
    // Resolved before cargo runs: cargo re-links `target/<profile>/tiervec-testbed` even when
    // nothing changed, and from then on the kernel names the running binary "… (deleted)".
    this_exe()?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        let profile_is_release = !cfg!(debug_assertions);
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "-p",
            "tiervec-testbed",
            "-p",
            "tiervec-cloud",
            "-p",
            "tiervec-edge",
            "--bins",
        ]);
        if profile_is_release {
            cmd.arg("--release");
        }
        let ok = cmd.status().context("running cargo build")?.success();
        anyhow::ensure!(ok, "building tiervec-cloud and tiervec-edge failed");
    }
    for name in ["tiervec-cloud", "tiervec-edge"] {
        binary(name)?;
    }
    Ok(())
}

/// The guest built with or without `simd128`, into its own target directory (so the scalar
/// build's flags never invalidate the other). Built here when run under cargo.
pub fn wasm_guest(simd: bool) -> anyhow::Result<PathBuf> {
    let target = PathBuf::from(if simd {
        "target/wasm-guest"
    } else {
        "target/wasm-guest-scalar"
    });
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "-q",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip1",
            "-p",
            "tiervec-wasm",
            "--target-dir",
        ])
        .arg(&target);
        if !simd {
            // RUSTFLAGS replaces the simd128 flag of .cargo/config.toml.
            cmd.env("RUSTFLAGS", "-C target-feature=-simd128");
        }
        let ok = cmd.status().context("running cargo build")?.success();
        anyhow::ensure!(ok, "building the guest (simd: {simd}) failed");
    }
    let path = target.join("wasm32-wasip1/guest/tiervec_wasm.wasm");
    anyhow::ensure!(
        path.exists(),
        "{} not found: run under cargo (`cargo run --release -p tiervec-testbed -- bench wasm`)",
        path.display()
    );
    Ok(path)
}

/// The path of the running testbed binary, as it was at the first call (see
/// [`ensure_binaries`]); the demo and the benchmarks start it again for their helper processes.
pub fn this_exe() -> anyhow::Result<PathBuf> {
    static THIS_EXE: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = THIS_EXE.get() {
        return Ok(path.clone());
    }
    let path = std::env::current_exe().context("locating the running testbed binary")?;
    Ok(THIS_EXE.get_or_init(|| path).clone())
}

/// A binary of this workspace next to the running one (or, for an integration test, whose
/// binary lies in `target/<profile>/deps`, in the folder above it).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let this = this_exe()?;
    let mut path = this.with_file_name(name);
    if !path.exists()
        && let Some(profile) = this
            .parent()
            .filter(|d| d.ends_with("deps"))
            .and_then(|d| d.parent())
    {
        path = profile.join(name);
    }
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p {name}`",
            path.display()
        );
    }
    Ok(path)
}

/// A memory field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, …) of process `pid` (`None`:
/// this one), in bytes; 0 when unreadable.
pub fn memory_field(pid: Option<u32>, field: &str) -> u64 {
    let path = pid.map_or("/proc/self/status".to_owned(), |p| {
        format!("/proc/{p}/status")
    });
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Whether `taskset` can pin processes here.
pub fn can_pin() -> bool {
    Command::new("taskset")
        .args(["-p", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pins every thread of process `pid` to `cpus` (a taskset list, e.g. "0" or "0,1").
pub fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let ok = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?
        .success();
    anyhow::ensure!(ok, "taskset -a -p -c {cpus} {pid} failed");
    Ok(())
}

/// Pins this process (the load generator) to `cpus`.
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    pin(std::process::id(), cpus)
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process, killed and reaped on drop.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Process {
    /// Starts `binary args…` with its stderr appended to `log`, under `taskset -c cpus` when
    /// given.
    pub fn start(
        name: &str,
        binary: &Path,
        args: &[String],
        cpus: Option<&str>,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = match cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = cmd
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Process {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}); see its log", self.name);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `path` holds a socket address (written atomically by `--addr-file`).
pub fn wait_addr_file(path: &Path, process: &mut Process) -> anyhow::Result<std::net::SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text
                .trim()
                .parse()
                .with_context(|| format!("{} holds `{text}`", path.display()));
        }
        process.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not bind within 60 s",
            process.name
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `url` until it answers 2xx, for at most `limit`.
pub async fn wait_http_ok(
    http: &reqwest::Client,
    url: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
