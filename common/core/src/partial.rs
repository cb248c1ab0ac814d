//! Where a file is written before it is renamed into place: a reader never sees half a file,
//! and an interrupted write leaves only the `.partial` name behind.

use std::path::{Path, PathBuf};

/// `dir/name.partial` next to the target, so the final rename stays on one filesystem.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}
