//! Finished images on the coordinator's file system: the side copies a client asks for with
//! `--output-dir`, and the coordinator's own files that `fetch` streams.
//!
//! A client's directory must lie under a root the operator allowed (`tessera coordinator
//! --allow-output-dir`, none by default). That is checked at submission from the path alone:
//! nothing touches the file system before a job is admitted. The copy, once the image is
//! finished, walks down from the root one directory at a time without following any link (a
//! link where a directory should be is an error), writes the image under a fresh name that no
//! one could have planted, and renames it into place without replacing anything already there.
//! A failed copy is a warning on the job: the image itself stays fetchable.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, RenameFlags};

/// `dir` as a client gave it, checked against the allowed roots: absolute, no `..`, under
/// one of `roots` (canonical paths). Returns the path and the root it lies under.
pub fn check_request(roots: &[PathBuf], dir: &str) -> Result<(PathBuf, PathBuf), String> {
    let path = Path::new(dir);
    if !path.is_absolute() {
        return Err(format!(
            "--output-dir {dir:?} must be an absolute path on the coordinator's machine"
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("--output-dir {dir}: `..` is not allowed in it"));
    }
    if roots.is_empty() {
        return Err(format!(
            "--output-dir {dir}: this coordinator takes no output directories from clients \
             (start it with --allow-output-dir DIR to allow directories under DIR); the images \
             are fetchable with `tessera fetch`"
        ));
    }
    let clean: PathBuf = path.components().collect();
    match roots.iter().find(|r| clean.starts_with(r)) {
        Some(root) => Ok((clean, root.clone())),
        None => Err(format!(
            "--output-dir {dir} is not under a directory this coordinator allows ({}): pick one \
             under them",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn no_links(path: &Path, e: io::Error) -> io::Error {
    let errno = rustix::io::Errno::from_io_error(&e);
    if matches!(
        errno,
        Some(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)
    ) {
        io::Error::other(format!(
            "{} is a symbolic link or not a directory (outputs never follow links)",
            path.display()
        ))
    } else {
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rustix::fs::open(path, flags, Mode::empty()).map_err(|e| no_links(path, e.into()))
}

/// `parent/name` as an open directory, made (mode `mode`) when missing; a link there, or
/// anything but a directory, is an error. `shown` is its path, for messages.
fn sub_dir(parent: &OwnedFd, name: &OsStr, mode: u32, shown: &Path) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(no_links(shown, e.into())),
    }
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|e| no_links(shown, e.into()))
}

/// Copies `from` to `dir/name`, `dir` lying under `root`: the directories below the root are
/// made as needed without following links, and the file is written under a fresh name then
/// renamed into place, never replacing (or following) an entry already called `name`.
pub fn copy_under(root: &Path, dir: &Path, name: &str, from: &Path) -> io::Result<PathBuf> {
    let below = dir.strip_prefix(root).map_err(|_| {
        io::Error::other(format!("{} is not under {}", dir.display(), root.display()))
    })?;
    let mut fd = open_dir(root)?;
    let mut here = root.to_path_buf();
    for part in below.components() {
        here.push(part);
        fd = sub_dir(&fd, part.as_os_str(), 0o755, &here)?;
    }
    let target = dir.join(name);
    let tmp = format!(".{name}.{:016x}.partial", rand::random::<u64>());
    let written = write_new(&fd, &tmp, from).and_then(|()| rename_new(&fd, &tmp, name));
    if written.is_err() {
        let _ = rustix::fs::unlinkat(&fd, tmp.as_str(), rustix::fs::AtFlags::empty());
    }
    written.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", target.display())))?;
    Ok(target)
}

/// Writes a copy of `from` to a file `name` that must not exist yet in `dir`.
fn write_new(dir: &OwnedFd, name: &str, from: &Path) -> io::Result<()> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o644))?;
    let mut out = std::fs::File::from(fd);
    let mut src = std::fs::File::open(from)?;
    io::copy(&mut src, &mut out)?;
    out.sync_all()
}

/// Renames `tmp` to `name` in `dir`, failing if `name` exists (where the file system cannot
/// say "no replace", a plain rename, which replaces an entry without following it).
fn rename_new(dir: &OwnedFd, tmp: &str, name: &str) -> io::Result<()> {
    match rustix::fs::renameat_with(dir, tmp, dir, name, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "something is already there; outputs never replace or follow what they find",
        )),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            Ok(rustix::fs::renameat(dir, tmp, dir, name)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The coordinator's own folder for job `job` (`output_dir/JOB`, mode 0700), made without
/// following a link.
pub fn job_dir(output_dir: &Path, job: &str) -> io::Result<PathBuf> {
    let root = open_dir(output_dir)?;
    let path = output_dir.join(job);
    sub_dir(&root, OsStr::new(job), 0o700, &path)?;
    Ok(path)
}

/// `output_dir/JOB/NAME` opened for reading, following no link at either level.
pub fn open_image(output_dir: &Path, job: &str, name: &str) -> io::Result<std::fs::File> {
    open_under(output_dir, &[job, name])
}

/// `output_dir/A/B/…/NAME` opened for reading, each part a plain name (no `..`, no `/`),
/// following no link at any level.
pub fn open_under(output_dir: &Path, parts: &[&str]) -> io::Result<std::fs::File> {
    let Some((name, dirs)) = parts.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file named"));
    };
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('/'))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a plain name",
        ));
    }
    let mut dir = open_dir(output_dir)?;
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    for part in dirs {
        dir = rustix::fs::openat(&dir, *part, flags, Mode::empty())?;
    }
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    Ok(std::fs::File::from(rustix::fs::openat(
        &dir,
        *name,
        flags,
        Mode::empty(),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tessera-outputs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.canonicalize().unwrap()
    }

    #[test]
    fn requests_must_lie_under_an_allowed_root() {
        let roots = vec![PathBuf::from("/srv/out"), PathBuf::from("/data")];
        assert!(check_request(&[], "/srv/out")
            .unwrap_err()
            .contains("--allow-output-dir"));
        assert!(check_request(&roots, "rel")
            .unwrap_err()
            .contains("absolute"));
        assert!(check_request(&roots, "/srv/out/../etc")
            .unwrap_err()
            .contains(".."));
        let e = check_request(&roots, "/srv/outside").unwrap_err();
        assert!(e.contains("/srv/out, /data"), "{e}");
        let (p, r) = check_request(&roots, "/srv/out/./a//b/").unwrap();
        assert_eq!((p, r), ("/srv/out/a/b".into(), "/srv/out".into()));
        assert!(check_request(&roots, "/data").is_ok());
    }

    #[test]
    fn copies_make_directories_and_never_follow_or_replace_links() {
        let root = scratch("copy");
        let outside = scratch("copy-outside");
        let src = root.join("src.png");
        std::fs::write(&src, b"image").unwrap();
        let dir = root.join("a/b");
        let to = copy_under(&root, &dir, "x.png", &src).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"image");

        // A link where a directory should be: nothing is written through it.
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let e = copy_under(&root, &root.join("link/c"), "x.png", &src).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // A link (or a file) at the final name is left as it is.
        let victim = outside.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("y.png")).unwrap();
        let e = copy_under(&root, &dir, "y.png", &src).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(dir.join("y.png"))
            .unwrap()
            .is_symlink());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");

        // The coordinator's own files: a linked job folder is not read through.
        std::os::unix::fs::symlink(&outside, root.join("job2")).unwrap();
        assert!(open_image(&root, "job2", "victim").is_err());
        assert!(job_dir(&root, "job2").is_err());
        let job = job_dir(&root, "job3").unwrap();
        std::fs::write(job.join("0.png"), b"png").unwrap();
        assert!(open_image(&root, "job3", "0.png").is_ok());
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
