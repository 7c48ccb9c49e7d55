//! Small file helpers: bounded reads, exclusive creation and atomic replacement.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{IdentityError, Result};

/// Largest certificate, key or CRL file we read. A CRL entry is ~40 bytes, so this holds
/// hundreds of thousands of revocations; anything bigger is not a file we wrote.
pub(crate) const PEM_FILE_LEN_MAX: u64 = 16 * 1024 * 1024;

/// Mode of private key files: owner only.
pub(crate) const MODE_SECRET: u32 = 0o600;
/// Mode of certificates and CRLs: public material.
pub(crate) const MODE_PUBLIC: u32 = 0o644;

/// Reads a whole file, refusing files larger than `PEM_FILE_LEN_MAX`.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| IdentityError::io("open", path, e))?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so an oversized file is detected, not truncated.
    file.take(PEM_FILE_LEN_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| IdentityError::io("read", path, e))?;
    if bytes.len() as u64 > PEM_FILE_LEN_MAX {
        return Err(IdentityError::parse(
            path.display().to_string(),
            format!("file is larger than {PEM_FILE_LEN_MAX} bytes"),
        ));
    }
    Ok(bytes)
}

/// All `CERTIFICATE` blocks of a PEM file, in order; at least one.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::parse(path.display().to_string(), e))?;
    if certs.is_empty() {
        return Err(IdentityError::parse(
            path.display().to_string(),
            "no CERTIFICATE block found",
        ));
    }
    Ok(certs)
}

/// The first certificate of a PEM file.
pub(crate) fn read_cert(path: &Path) -> Result<CertificateDer<'static>> {
    let mut certs = read_certs(path)?;
    // read_certs guarantees one element; swap_remove keeps this free of indexing panics.
    Ok(certs.swap_remove(0))
}

/// The private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    // Warn, not fail: some secret stores mount files 0644 inside a private directory.
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                key = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "private key file is readable by group or others"
            );
        }
    }
    let pem = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| IdentityError::parse(format!("private key {}", path.display()), e))
}

/// Creates `path` with `mode`, failing if it exists. The mode is applied at creation so a
/// secret is never readable by others, not even for an instant.
pub(crate) fn create_new(path: &Path, mode: u32, contents: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| IdentityError::io("create", path, e))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|e| IdentityError::io("write", path, e))?;
    sync_parent(path)
}

/// Replaces `path` atomically: readers see the old file or the new one, never a mix. The
/// temporary file is created with `mode` in the same directory (rename must not cross file
/// systems) and fsynced before the rename.
pub(crate) fn write_atomic(path: &Path, mode: u32, contents: &[u8]) -> Result<()> {
    let tmp = temp_path(path)?;
    let written = create_new(&tmp, mode, contents)
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| IdentityError::io("rename", path, e)));
    if written.is_err() {
        // Best effort: the temp name is unique, so a leftover only wastes space.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

fn temp_path(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        IdentityError::io(
            "write",
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;
    let suffix: u64 = rand::thread_rng().gen();
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}.{suffix:016x}", std::process::id()));
    Ok(path.with_file_name(tmp_name))
}

/// Fsyncs the directory holding `path`, so a create or rename survives a crash.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| IdentityError::io("sync directory", parent, e))
}
