//! Saves that a crash cannot tear: a file is replaced by renaming a synced temporary over it, a
//! directory by building the new one beside it and swapping the two in one `rename`.
//!
//! A directory save (an adapter, a ReFT model, a merge) writes every new file into
//! `.<name>.tch-peft-tmp.<pid>.<thread>.<n>` next to the destination, hard-links in whatever
//! else the destination holds (files it does not own: a README, other adapters' directories),
//! syncs it, and then exchanges it with the destination atomically (Linux `renameat2(…,
//! RENAME_EXCHANGE)`); the old tree is then deleted. A reader therefore sees the whole old
//! directory or the whole new one. Where the kernel or file system cannot exchange, the old
//! directory is renamed aside first (`.<name>.tch-peft-old.…`) and the new one renamed in, and
//! the next save puts an aside copy back if a crash came between the two renames. Temporaries
//! left by a crashed process are deleted by the next save of the same destination.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

const TMP_TAG: &str = ".tch-peft-tmp.";
const OLD_TAG: &str = ".tch-peft-old.";

/// `(parent, file name)` of a path, `.` standing for an empty parent.
fn split(path: &Path) -> Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("the path has no final name")))?
        .to_string_lossy()
        .into_owned();
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// A name no other save, thread or process uses at the same time: pid, thread and a counter.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    format!("{}.{thread}.{n}", std::process::id())
}

/// Whether the process that made a temporary named `…<tag><pid>.…` is gone.
fn owner_is_gone(name: &str, tag: &str) -> bool {
    let Some(pid) = name.split(tag).nth(1).and_then(|r| r.split('.').next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else { return false };
    if pid as u32 == std::process::id() {
        return false;
    }
    #[cfg(unix)]
    {
        // SAFETY: signal 0 only checks that the process exists
        let r = unsafe { libc::kill(pid, 0) };
        r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        false
    }
}

/// Deletes the temporaries of `name` in `parent` whose process is gone.
fn clean_stale(parent: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        // exactly this destination's temporaries (not those of `name.v2`)
        let stale = [TMP_TAG, OLD_TAG]
            .iter()
            .any(|t| file.starts_with(&format!(".{name}{t}")) && owner_is_gone(&file, t));
        if stale {
            let p = e.path();
            let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        }
    }
}

/// Syncs a directory, so that the renames in it survive a power loss.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    let _ = dir;
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (named by pid,
/// thread and a counter), written, synced, renamed over `path`, and the directory synced. A
/// crash leaves either the old file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, name) = split(path)?;
    clean_stale(&dir, &name);
    let tmp = dir.join(format!(".{name}{TMP_TAG}{}", unique_suffix()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Swaps two directories atomically; `Ok(false)` where the system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    const RENAME_EXCHANGE: libc::c_uint = 2;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|e| Error::io(a, e.into()))?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|e| Error::io(b, e.into()))?;
    // SAFETY: two NUL-terminated paths that outlive the call
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(Error::io(b, err)),
    }
}

/// Swaps two directories atomically; `Ok(false)` where the system cannot.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// Mirrors what `from` holds and `into` lacks into `into`: files as hard links (copies where
/// linking is refused), directories recursively; not the save's temporaries, and at the top
/// level not the names the save `owns` (what it replaces, e.g. weight shards of an old merge).
fn carry_over(from: &Path, into: &Path, owns: &dyn Fn(&str) -> bool) -> Result<()> {
    for e in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let file = e.file_name().to_string_lossy().into_owned();
        if file.contains(TMP_TAG) || file.contains(OLD_TAG) || owns(&file) {
            continue;
        }
        let (src, dst) = (e.path(), into.join(e.file_name()));
        let ty = e.file_type().map_err(|err| Error::io(&src, err))?;
        if ty.is_dir() {
            if !dst.exists() {
                fs::create_dir(&dst).map_err(|err| Error::io(&dst, err))?;
            } else if !dst.is_dir() {
                continue;
            }
            carry_over(&src, &dst, &|_| false)?;
        } else if fs::symlink_metadata(&dst).is_err() && fs::hard_link(&src, &dst).is_err() {
            if ty.is_symlink() {
                #[cfg(unix)]
                {
                    let target = fs::read_link(&src).map_err(|err| Error::io(&src, err))?;
                    std::os::unix::fs::symlink(target, &dst).map_err(|err| Error::io(&dst, err))?;
                }
            } else if ty.is_file() {
                fs::copy(&src, &dst).map_err(|err| Error::io(&src, err))?;
            }
        }
    }
    Ok(())
}

/// Replaces the directory `target` by what `write` puts into the empty directory it is given,
/// plus everything else `target` already holds (see the [module docs](self)): readers see the
/// old directory or the new one, never a mix. Top-level entries for which `owns` is true are
/// the save's own (left behind when it does not write them again). On any error the
/// destination is untouched and the temporary is removed.
pub(crate) fn replace_dir(
    target: &Path,
    owns: &dyn Fn(&str) -> bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    // a link to a directory: replace what it points to, keep the link; `.` or `x/..`: the
    // directory they name
    let target = match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() || target.file_name().is_none() => {
            fs::canonicalize(target).map_err(|e| Error::io(target, e))?
        }
        _ => target.to_path_buf(),
    };
    let (parent, name) = split(&target)?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    recover_aside(&parent, &name, &target)?;
    clean_stale(&parent, &name);
    let exists = match fs::metadata(&target) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(Error::io(&target, std::io::Error::other("exists and is not a directory")))
        }
        Err(_) => false,
    };
    let tmp = parent.join(format!(".{name}{TMP_TAG}{}", unique_suffix()));
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let staged = (|| {
        write(&tmp)?;
        if exists {
            carry_over(&target, &tmp, owns)?;
        }
        sync_tree(&tmp)
    })();
    if let Err(e) = staged {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if !exists {
        match fs::rename(&tmp, &target) {
            Ok(()) => return sync_dir(&parent),
            // another save created it meanwhile: replace that one (it holds only its own files)
            Err(e) if fs::metadata(&target).is_ok_and(|m| m.is_dir()) => {
                if !exchange(&tmp, &target).unwrap_or(false) {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(Error::io(&target, e));
                }
                sync_dir(&parent)?;
                let _ = fs::remove_dir_all(&tmp);
                return Ok(());
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(Error::io(&target, e));
            }
        }
    }
    match exchange(&tmp, &target) {
        Ok(true) => {
            sync_dir(&parent)?;
            let _ = fs::remove_dir_all(&tmp); // the old tree now
            return Ok(());
        }
        Ok(false) => {}
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    let aside = parent.join(format!(".{name}{OLD_TAG}{}", unique_suffix()));
    if let Err(e) = fs::rename(&target, &aside) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::io(&target, e));
    }
    if let Err(e) = fs::rename(&tmp, &target) {
        // put the old tree back: the destination is never left missing by an error
        let _ = fs::rename(&aside, &target);
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::io(&target, e));
    }
    sync_dir(&parent)?;
    let _ = fs::remove_dir_all(&aside);
    Ok(())
}

/// After a crash between the two renames of the fallback: the destination is missing and the
/// old tree is aside; put it back.
fn recover_aside(parent: &Path, name: &str, target: &Path) -> Result<()> {
    if fs::symlink_metadata(target).is_ok() {
        return Ok(());
    }
    let Ok(entries) = fs::read_dir(parent) else { return Ok(()) };
    let prefix = format!(".{name}{OLD_TAG}");
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            fs::rename(e.path(), target).map_err(|err| Error::io(target, err))?;
            return Ok(());
        }
    }
    Ok(())
}

/// Syncs every file and directory under `dir` (the staged tree, before it goes live).
fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let ty = e.file_type().map_err(|err| Error::io(e.path(), err))?;
        if ty.is_dir() {
            sync_tree(&e.path())?;
        } else if ty.is_file() {
            let f = fs::File::open(e.path()).map_err(|err| Error::io(e.path(), err))?;
            f.sync_all().map_err(|err| Error::io(e.path(), err))?;
        }
    }
    sync_dir(dir)
}
