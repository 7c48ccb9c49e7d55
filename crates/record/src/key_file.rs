use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::{reject, RecordError};
use crate::limits::PUBLIC_KEY_BYTES;
use crate::reason::Reason;
use crate::verify::parse_public_key;

/// Key files hold 64 hex digits and a newline; anything much longer is not a key file, and
/// reading stops there rather than pulling an arbitrary file into memory.
const KEY_FILE_BYTES_MAX: u64 = 1024;

/// Writes the secret seed of `key` as lowercase hex and a newline to `path`, created with mode
/// 0600, and the public key the same way to `path` + `.pub`.
///
/// The secret file is created with its final mode (never widened then narrowed, so it is never
/// readable by others, even briefly) and must not exist yet: overwriting would silently destroy a
/// key that may still be bound to a service.
pub fn write_key_files(path: &Path, key: &SigningKey) -> Result<(), RecordError> {
    let secret = format!("{}\n", hex::encode(key.to_bytes()));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    write_file(path, &options, secret.as_bytes())?;
    let public = format!("{}\n", public_key_hex(&key.verifying_key()));
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    write_file(&public_key_path(path), &options, public.as_bytes())
}

/// The path of the public key file that goes with the secret key file at `path`.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".pub");
    PathBuf::from(name)
}

/// Reads a secret key file written by [`write_key_files`]. Surrounding whitespace is accepted.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, RecordError> {
    let seed = parse_hex32(path, &read_key_file(path)?)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key file (hex of the raw 32-byte key). Surrounding whitespace is accepted.
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, RecordError> {
    let raw = parse_hex32(path, &read_key_file(path)?)?;
    parse_public_key(&raw).map_err(|e| {
        RecordError::new(
            e.reason(),
            format!("key file {}: {}", path.display(), e.detail()),
        )
    })
}

/// The lowercase hex of a public key.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// Parses the hex of a raw 32-byte public key (surrounding whitespace accepted) and checks that
/// it is a valid point.
pub fn parse_public_key_hex(text: &str) -> Result<VerifyingKey, RecordError> {
    parse_public_key(&decode_hex32(text)?)
}

fn write_file(path: &Path, options: &OpenOptions, contents: &[u8]) -> Result<(), RecordError> {
    let io_error = |source| RecordError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(contents).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

fn read_key_file(path: &Path) -> Result<String, RecordError> {
    let io_error = |source| RecordError::KeyFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let mut text = String::new();
    let read = file
        .take(KEY_FILE_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .map_err(io_error)?;
    if read as u64 > KEY_FILE_BYTES_MAX {
        return reject(
            Reason::Malformed,
            format!(
                "key file {}: larger than {KEY_FILE_BYTES_MAX} bytes, not a key file",
                path.display()
            ),
        );
    }
    Ok(text)
}

fn parse_hex32(path: &Path, text: &str) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    decode_hex32(text).map_err(|e| {
        RecordError::new(
            e.reason(),
            format!("key file {}: {}", path.display(), e.detail()),
        )
    })
}

fn decode_hex32(text: &str) -> Result<[u8; PUBLIC_KEY_BYTES], RecordError> {
    let text = text.trim();
    if text.len() != 2 * PUBLIC_KEY_BYTES {
        return reject(
            Reason::Malformed,
            format!(
                "expected {} hex digits ({PUBLIC_KEY_BYTES} bytes), found {} characters",
                2 * PUBLIC_KEY_BYTES,
                text.chars().count()
            ),
        );
    }
    let mut raw = [0u8; PUBLIC_KEY_BYTES];
    hex::decode_to_slice(text, &mut raw)
        .map_err(|e| RecordError::new(Reason::Malformed, format!("invalid hex: {e}")))?;
    Ok(raw)
}
