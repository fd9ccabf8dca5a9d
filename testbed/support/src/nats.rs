//! [`NatsCluster`]: real `nats-server` processes (Debian's package) forming a JetStream
//! cluster on loopback, each member killable (SIGKILL) and restartable on its ports and store.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::free_tcp_port;
use crate::process::ChildGuard;

/// One member: its ports, its folder (config, JetStream store, log) and its process.
#[derive(Debug)]
pub struct NatsServer {
    pub client_port: u16,
    pub monitor_port: u16,
    dir: PathBuf,
    process: Option<ChildGuard>,
}

/// The server certificate of every member and the CA that its clients' certificates must be
/// signed by (PEM files).
#[derive(Debug)]
pub struct NatsTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A JetStream cluster of `nats-server` processes, stopped when dropped.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

/// The `nats-server` binary: `TIERVEC_NATS_SERVER`, else the Debian package's path, else the
/// one on `PATH`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TIERVEC_NATS_SERVER") {
        return path.into();
    }
    let debian = Path::new("/usr/sbin/nats-server");
    if debian.exists() {
        debian.to_owned()
    } else {
        "nats-server".into()
    }
}

impl NatsCluster {
    /// Starts `n` servers in folders under `dir`, clustered with each other (`n` = 1: a
    /// single JetStream server), and waits until JetStream answers on every one.
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        NatsCluster::start_with_user(dir, n, None)
    }

    /// [`NatsCluster::start`] with clients required to log in as `user` (name, password).
    pub fn start_with_user(dir: &Path, n: usize, user: Option<(&str, &str)>) -> NatsCluster {
        NatsCluster::start_with(dir, n, user, None)
    }

    /// [`NatsCluster::start`] with client connections over TLS and clients required to
    /// present a certificate signed by `tls`'s CA (`verify: true`).
    pub fn start_with_tls(dir: &Path, n: usize, tls: &NatsTls) -> NatsCluster {
        NatsCluster::start_with(dir, n, None, Some(tls))
    }

    fn start_with(
        dir: &Path,
        n: usize,
        user: Option<(&str, &str)>,
        tls: Option<&NatsTls>,
    ) -> NatsCluster {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_tcp_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let mut servers = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let server_dir = dir.join(format!("nats-{i}"));
            std::fs::create_dir_all(&server_dir).expect("a server folder");
            let (client_port, monitor_port) = (free_tcp_port(), free_tcp_port());
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: tiervec, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let authorization = match user {
                Some((name, password)) => {
                    format!("authorization {{ user: {name:?}, password: {password:?} }}\n")
                }
                None => String::new(),
            };
            let tls = match tls {
                Some(t) => format!(
                    "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
                    t.cert, t.key, t.ca
                ),
                None => String::new(),
            };
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{monitor_port}\n\
                 max_payload: 8MB\n{authorization}{tls}\
                 jetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 4GB }}\n{cluster}",
                server_dir.join("store").to_str().expect("a UTF-8 path"),
            );
            std::fs::write(server_dir.join("server.conf"), config).expect("a server config");
            let mut server = NatsServer {
                client_port,
                monitor_port,
                dir: server_dir,
                process: None,
            };
            server.spawn();
            servers.push(server);
        }
        let cluster = NatsCluster { servers };
        for s in &cluster.servers {
            s.wait_ready(Duration::from_secs(30));
        }
        cluster
    }

    /// The client URLs of every member, for a cloud's `cluster.nats`.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect()
    }
}

impl NatsServer {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("a server log");
        let child = Command::new(nats_server_binary())
            .arg("-c")
            .arg(self.dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (Debian: apt-get install nats-server)");
        self.process = Some(ChildGuard::new(child));
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().expect("the server is killed");
        }
    }

    /// Starts it again on the same ports and store, and waits until JetStream answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready(Duration::from_secs(30));
    }

    /// Waits until the monitoring endpoint's `/healthz?js-enabled-only=true` answers 200.
    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let addr = format!("127.0.0.1:{}", self.monitor_port);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let request = format!(
                    "GET /healthz?js-enabled-only=true HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                );
                let mut head = [0u8; 12];
                if s.write_all(request.as_bytes()).is_ok()
                    && s.read_exact(&mut head).is_ok()
                    && head.ends_with(b"200")
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server on {addr} was not ready within {within:?}");
    }
}
