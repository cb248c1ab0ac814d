//! Output files named on the command line, checked before any work starts: a render that
//! cannot write its PNG must say so in its first second, not after hours of denoising, and a
//! client before any call to the coordinator. The check writes nothing: writability is asked of
//! the operating system (`access(2)`), so no probe file is ever left behind.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};

/// Checks that each `(flag, path)` names a file that can be written: a file name (not a
/// directory), in an existing directory this process may create files in, and no two flags
/// naming the same file. Files are written under a temporary name in the same directory and
/// renamed into place, so the directory is what must be writable.
pub fn check_writable(outputs: &[(&str, &Path)]) -> Result<()> {
    for (flag, path) in outputs {
        check_one(flag, path)?;
    }
    for (i, (flag, path)) in outputs.iter().enumerate() {
        if let Some((other, _)) = outputs[..i].iter().find(|(_, p)| same_file(p, path)) {
            bail!(
                "{other} and {flag} both name {}: give each its own file",
                path.display()
            );
        }
    }
    Ok(())
}

fn check_one(flag: &str, path: &Path) -> Result<()> {
    let shown = path.display();
    let names_a_dir = path.as_os_str().is_empty()
        || path.file_name().is_none()
        || path.as_os_str().to_string_lossy().ends_with('/')
        || path.is_dir();
    if names_a_dir {
        bail!("{flag} {shown} is a directory: name a file in it, e.g. {flag} {shown}/out.png");
    }
    let dir = directory_of(path);
    let dir_shown = dir.display();
    match std::fs::metadata(&dir) {
        Err(_) => bail!(
            "{flag} {shown}: the directory {dir_shown} does not exist: create it \
             (mkdir -p {dir_shown}) or name a file in another one"
        ),
        Ok(m) if !m.is_dir() => bail!("{flag} {shown}: {dir_shown} is not a directory"),
        Ok(_) => {}
    }
    if let Err(e) = may_create_files_in(&dir) {
        bail!(
            "{flag} {shown}: cannot create files in {dir_shown} ({e}): name a file in a \
             directory you can write to"
        );
    }
    Ok(())
}

/// The directory a file is created in: its parent, or `.` for a bare file name.
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether two paths name one file: the same file name in the same directory (compared after
/// resolving the directories, which exist by now).
fn same_file(a: &Path, b: &Path) -> bool {
    let key = |p: &Path| {
        let dir = directory_of(p);
        let dir = dir.canonicalize().unwrap_or(dir);
        (
            dir,
            p.components()
                .next_back()
                .map(Component::as_os_str)
                .map(ToOwned::to_owned),
        )
    };
    key(a) == key(b)
}

/// Whether this process may create (and rename) files in `dir`: write and search permission,
/// on a file system mounted read-write.
#[cfg(unix)]
fn may_create_files_in(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; access(2) only
    // reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn may_create_files_in(dir: &Path) -> std::io::Result<()> {
    if std::fs::metadata(dir)?.permissions().readonly() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "read-only",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(outputs: &[(&str, &Path)]) -> String {
        format!("{:#}", check_writable(outputs).unwrap_err())
    }

    #[test]
    fn writable_files_pass_and_the_check_leaves_nothing_behind() {
        let dir = tessera_harness::Scratch::new("output-check").unwrap();
        let png = dir.path("a.png");
        let latents = dir.path("a.safetensors");
        check_writable(&[("-o", &png), ("--output-latents", &latents)]).unwrap();
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
        // A bare file name lives in the working directory.
        check_writable(&[("-o", Path::new("x.png"))]).unwrap();
    }

    #[test]
    fn unusable_outputs_are_named_with_what_to_do() {
        let dir = tessera_harness::Scratch::new("output-check-bad").unwrap();
        let missing = dir.path("no/such/dir/a.png");
        let e = err(&[("-o", &missing)]);
        assert!(
            e.contains("-o ") && e.contains("does not exist") && e.contains("mkdir -p"),
            "{e}"
        );
        let e = err(&[("--preview", &dir.path(""))]);
        assert!(e.contains("is a directory"), "{e}");
        let file = dir.path("plain");
        std::fs::write(&file, b"x").unwrap();
        let e = err(&[("-o", &file.join("a.png"))]);
        assert!(e.contains("is not a directory"), "{e}");
        let png = dir.path("a.png");
        let again = dir.path("./a.png");
        let e = err(&[("-o", &png), ("--preview", &again)]);
        assert!(e.starts_with("-o and --preview both name"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_without_write_permission_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tessera_harness::Scratch::new("output-check-ro").unwrap();
        let ro = dir.path("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let result = check_writable(&[("-o", &ro.join("a.png"))]);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The kernel's own answer: root may create files anywhere, everyone else is refused.
        if unsafe { libc::geteuid() } == 0 {
            assert!(result.is_ok(), "{result:?}");
        } else {
            let e = format!("{:#}", result.unwrap_err());
            assert!(e.contains("cannot create files in"), "{e}");
        }
    }
}
