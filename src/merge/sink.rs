//! The merged file's writer: bytes appended through one aligned staging block, written with
//! `O_DIRECT` where the file system takes it (Linux), else through the page cache.
//!
//! Why direct: a merge writes a file as large as a model once and syncs it. Through the page
//! cache every byte is first copied into freshly allocated cache pages (which the kernel must
//! find and, on a virtual machine, often fault in from the host), and the closing `fsync` then
//! waits for all of it at once. Written directly, each block goes from the staging block to
//! the disk while the merge computes the next tensor, and the sync at the end has nothing left
//! to wait for. File systems that refuse `O_DIRECT` (tmpfs, some network file systems) refuse
//! it when the file is opened or at the first write; the writer then goes on buffered, with
//! the same bytes.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Bytes per direct write (and the staging block's size).
const BLOCK_BYTES: usize = 8 << 20;
/// The alignment direct I/O needs of offsets, lengths and memory (the largest logical block
/// size in use: 4 KiB).
const ALIGN: usize = 4096;

/// A block of `BLOCK_BYTES` aligned to `ALIGN`, in safe storage: the aligned window of a
/// slightly larger `Vec<u64>`.
struct Staging {
    words: Vec<u64>,
    start: usize,
}

impl Staging {
    fn new() -> Staging {
        let words = vec![0u64; (BLOCK_BYTES + ALIGN) / 8];
        let start = words.as_ptr().cast::<u8>().align_offset(ALIGN);
        Staging { words, start }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the window [start, start + BLOCK_BYTES) lies inside the initialised words
        // (start < ALIGN); u8 has no alignment needs
        unsafe {
            std::slice::from_raw_parts_mut(
                self.words.as_mut_ptr().cast::<u8>().add(self.start),
                BLOCK_BYTES,
            )
        }
    }
}

/// Appends bytes to a new file; [`Sink::finish`] writes the tail and sets the file's length.
pub(crate) struct Sink {
    file: File,
    path: PathBuf,
    staging: Staging,
    /// Bytes staged, not yet written.
    filled: usize,
    /// Bytes written to the file so far (a multiple of `BLOCK_BYTES` while direct).
    written: u64,
    direct: bool,
}

impl Sink {
    /// Creates (truncates) `path`, for direct writes where the file system allows them.
    pub(crate) fn create(path: &Path) -> Result<Sink> {
        let (file, direct) = open(path)?;
        Ok(Sink {
            file,
            path: path.to_path_buf(),
            staging: Staging::new(),
            filled: 0,
            written: 0,
            direct,
        })
    }

    /// Appends `bytes`.
    pub(crate) fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = bytes.len().min(BLOCK_BYTES - self.filled);
            self.staging.bytes_mut()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BLOCK_BYTES {
                self.flush_block(BLOCK_BYTES)?;
            }
        }
        Ok(())
    }

    /// Writes what is staged and leaves the file exactly as long as the bytes appended (a
    /// direct tail is written padded to the alignment, then the padding cut off).
    pub(crate) fn finish(mut self) -> Result<File> {
        let len = self.written + self.filled as u64;
        let filled = self.filled;
        let padded = if self.direct { filled.next_multiple_of(ALIGN) } else { filled };
        if filled > 0 {
            self.staging.bytes_mut()[filled..padded].fill(0);
            self.flush_block(padded)?;
        }
        if padded != filled {
            self.file.set_len(len).map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(self.file)
    }

    /// Writes the first `n` staged bytes at the end of what is written (at an explicit offset,
    /// so that a write retried buffered after a refused direct one rewrites the same bytes).
    fn flush_block(&mut self, n: usize) -> Result<()> {
        let at = self.written;
        let result = write_at(&self.file, &self.staging.bytes_mut()[..n], at);
        match result {
            Err(e) if self.direct && e.raw_os_error() == Some(EINVAL) => {
                // the file system took O_DIRECT at open but not this write (its alignment):
                // go on buffered from here
                self.direct = false;
                clear_direct(&self.file).map_err(|e| Error::io(&self.path, e))?;
                write_at(&self.file, &self.staging.bytes_mut()[..n], at)
            }
            other => other,
        }
        .map_err(|e| Error::io(&self.path, e))?;
        self.written += n as u64;
        self.filled = 0;
        Ok(())
    }
}

/// Writes all of `bytes` at `offset`.
#[cfg(unix)]
fn write_at(f: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, bytes, offset)
}

#[cfg(not(unix))]
fn write_at(mut f: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(bytes)
}

#[cfg(target_os = "linux")]
const EINVAL: i32 = libc::EINVAL;
#[cfg(not(target_os = "linux"))]
const EINVAL: i32 = 22;

/// Opens `path` for writing, direct where it can be: `(file, direct)`.
#[cfg(target_os = "linux")]
fn open(path: &Path) -> Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if !direct_io_wanted() {
        return Ok((o.open(path).map_err(|e| Error::io(path, e))?, false));
    }
    match o.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((o.open(path).map_err(|e| Error::io(path, e))?, false))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(not(target_os = "linux"))]
fn open(path: &Path) -> Result<(File, bool)> {
    Ok((File::create(path).map_err(|e| Error::io(path, e))?, false))
}

/// Whether direct writes are wanted: yes, unless `TCH_PEFT_MERGE_DIRECT_IO=0`.
fn direct_io_wanted() -> bool {
    std::env::var("TCH_PEFT_MERGE_DIRECT_IO").map_or(true, |v| v != "0")
}

/// Clears `O_DIRECT` on an open file.
#[cfg(target_os = "linux")]
fn clear_direct(f: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor this process owns change only its status flags
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn clear_direct(_: &File) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file holds exactly the bytes appended, across block boundaries and with a tail,
    /// direct or buffered.
    #[test]
    fn appends_exactly() {
        let dir = std::env::temp_dir().join(format!("tch-peft-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.bin");
        let data: Vec<u8> = (0..BLOCK_BYTES * 2 + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let mut s = Sink::create(&path).unwrap();
        for piece in data.chunks(BLOCK_BYTES / 3 + 17) {
            s.write_all(piece).unwrap();
        }
        s.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
