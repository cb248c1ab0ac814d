//! Fixtures a test process shares between its tests (a synthesized model, say) live in the
//! temporary directory under the process' id; they are removed when the process exits, or
//! every run of the suite would leave its copies behind.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes `dir` and everything in it when this process exits normally: after its last test,
/// failed tests included (the test harness exits, it does not abort). A process killed by a
/// signal leaves it.
pub fn remove_at_exit(dir: PathBuf) {
    static REGISTER: Once = Once::new();
    // SAFETY: `remove_all` is a plain `extern "C"` function that neither unwinds nor takes
    // arguments, as atexit requires.
    REGISTER.call_once(|| unsafe {
        libc::atexit(remove_all);
    });
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

extern "C" fn remove_all() {
    let dirs = std::mem::take(&mut *DIRS.lock().unwrap_or_else(|e| e.into_inner()));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "TESSERA_CLEANUP_TEST_DIR";

    /// Run as a child (with CHILD set): registers the directory and ends; run as the test,
    /// starts that child and checks the directory is gone once it has exited.
    #[test]
    fn a_registered_directory_is_gone_when_the_process_exits() {
        if let Some(dir) = std::env::var_os(CHILD) {
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(dir.join("inside")).unwrap();
            std::fs::write(dir.join("inside/file"), b"x").unwrap();
            remove_at_exit(dir);
            return;
        }
        let dir = std::env::temp_dir().join(format!("tessera-cleanup-test-{}", std::process::id()));
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cleanup::tests::a_registered_directory_is_gone_when_the_process_exits",
            ])
            .env(CHILD, &dir)
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        assert!(
            String::from_utf8_lossy(&status.stdout).contains("1 passed"),
            "the child ran the test: {status:?}"
        );
        assert!(!dir.exists(), "{} is still there", dir.display());
    }
}
