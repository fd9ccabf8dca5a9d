//! [`ChildGuard`]: a child process that cannot outlive its test.

use std::io;
use std::process::{Child, ExitStatus};

/// A child process killed (SIGKILL) and waited for when dropped, so a test that fails (or
/// returns) leaves no process behind and no zombie.
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// The child, to wait on, poll or read its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Kills it now (SIGKILL) and waits for it: `kill -9` at a moment the test chooses.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.0.kill()?;
        self.0.wait()
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        Self::new(child)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address a server wrote to its `--addr-file`, waited for up to `within`.
pub fn read_addr_file(path: &std::path::Path, within: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(addr) = std::fs::read_to_string(path)
            && !addr.is_empty()
        {
            return addr.trim().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no address in {} within {within:?}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits up to `within` for `GET /readyz` at `addr` to answer 200 (plain HTTP/1.1 over a
/// loopback socket, so that any test can call it without an async runtime).
pub fn wait_http_ready(addr: &str, within: std::time::Duration) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let request =
                format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.write_all(request.as_bytes()).is_ok()
                && s.read_exact(&mut head).is_ok()
                && head.ends_with(b"200")
            {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{addr} was not ready within {within:?}");
}
