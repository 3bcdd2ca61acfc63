//! Opening what a caller hands us: regular files only (a FIFO would block the reader forever, a
//! link to `/dev/zero` would be read until memory runs out), sizes capped by what the format can
//! need, and relative names that a file declares kept inside their directory.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// The largest JSON or YAML file read as a config (`adapter_config.json`, `config.json`,
/// `reft_config.json`, `model.safetensors.index.json`, a mergekit YAML): 64 MiB.
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// The largest pickle (`data.pkl` of a `torch.save` archive) the reader runs: 64 MiB.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// The largest safetensors header (its JSON), as the safetensors crate allows: 100 MB.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptFile { file: path.to_path_buf(), reason: reason.into() }
}

/// Opens `path` for reading when it is a regular file (after following symbolic links) and
/// returns it with its length. The open itself cannot block: on Unix it is non-blocking, and the
/// type is checked on the opened file, so nothing can be swapped in between.
pub(crate) fn open_regular(path: &Path) -> Result<(File, u64)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "not a regular file" };
        return Err(corrupt(path, format!("{what} (a FIFO, socket or device is never read)")));
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `max` bytes whole. A file that grows or shrinks while it is
/// read is an error, not a short or endless read.
pub(crate) fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > max {
        return Err(corrupt(path, format!("{len} bytes, more than the {max} allowed here")));
    }
    let mut buf = Vec::new();
    buf.try_reserve_exact(len as usize)
        .map_err(|_| corrupt(path, format!("{len} bytes do not fit in memory")))?;
    file.take(len.saturating_add(1)).read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 != len {
        return Err(corrupt(path, "the file changed size while it was read"));
    }
    Ok(buf)
}

/// Reads a config file (UTF-8, at most [`MAX_CONFIG_BYTES`]).
pub(crate) fn read_config(path: &Path) -> Result<String> {
    let bytes = read_capped(path, MAX_CONFIG_BYTES)?;
    String::from_utf8(bytes).map_err(|e| corrupt(path, format!("not UTF-8: {e}")))
}

/// `dir/name` for a file name that a file declares (a shard in `weight_map`, a pyvene key):
/// refused when absolute, empty, or when it leaves `dir` (`..`, a drive or root component).
pub(crate) fn join_inside(dir: &Path, name: &str, declared_in: &Path) -> Result<PathBuf> {
    let rel = Path::new(name);
    let inside = !name.is_empty()
        && !name.contains('\0')
        && rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(corrupt(
            declared_in,
            format!("`{name}` is not a file name inside {}", dir.display()),
        ));
    }
    Ok(dir.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_their_directory() {
        let (dir, f) = (Path::new("/m"), Path::new("/m/index.json"));
        assert_eq!(join_inside(dir, "a.safetensors", f).unwrap(), Path::new("/m/a.safetensors"));
        assert!(join_inside(dir, "sub/a.safetensors", f).is_ok());
        for bad in ["", "../a", "/etc/passwd", "a/../../b", "a\0b"] {
            assert!(join_inside(dir, bad, f).is_err(), "{bad:?}");
        }
    }
}
