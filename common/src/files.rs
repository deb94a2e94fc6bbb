//! File helpers shared by the coordinator, the agent and the CLI: hashing a file without holding it in
//! memory, and the free space of a file system.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Bytes read at a time when hashing.
const READ_BYTES: usize = 1 << 20;

/// Feeds the first `len` bytes of `path` (all of it when None) into `hasher`, a buffer at a time.
/// Returns how many bytes were read.
pub fn hash_into(path: &Path, len: Option<u64>, hasher: &mut Sha256) -> std::io::Result<u64> {
    let f = std::fs::File::open(path)?;
    let mut r = f.take(len.unwrap_or(u64::MAX));
    let mut buf = vec![0u8; READ_BYTES];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// sha256 (lower-case hex) and size of a file, read a buffer at a time.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let n = hash_into(path, None, &mut h)?;
    Ok((hex::encode(h.finalize()), n))
}

/// Free bytes on the file system that holds `path`, for unprivileged users, when it can be told.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right size;
    // statvfs fills it when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u64 here, u32 on some).
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Space to keep free beside a write of many bytes, so the database and logs on the same disk do not
/// run out: a tenth of what is free, at most 64 MiB.
pub fn reserve(free: u64) -> u64 {
    (free / 10).min(64 << 20)
}

/// Whether `need` more bytes fit on a disk with `free` bytes, keeping [`reserve`] spare.
pub fn fits(need: u64, free: u64) -> bool {
    need.saturating_add(reserve(free)) <= free
}

/// Syncs a folder, so that a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_hashes_as_its_bytes_do_and_a_prefix_as_its_prefix() {
        let dir = std::env::temp_dir().join(format!("fb-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            (crate::sha256_hex(&bytes), bytes.len() as u64)
        );
        let mut h = Sha256::new();
        assert_eq!(hash_into(&p, Some(1000), &mut h).unwrap(), 1000);
        assert_eq!(hex::encode(h.finalize()), crate::sha256_hex(&bytes[..1000]));
        assert!(free_bytes(&dir).unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
