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
