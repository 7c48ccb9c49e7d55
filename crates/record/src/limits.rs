//! Every bound the record model enforces. Units come last in each name.

/// Largest encoded payload inside an envelope.
pub const PAYLOAD_BYTES_MAX: usize = 8192;
/// Largest encoded envelope (single or multi-signature), checked before decoding.
pub const ENVELOPE_BYTES_MAX: usize = 16384;
/// Most endpoints in one record.
pub const ENDPOINTS_MAX: usize = 16;
/// Longest endpoint host (a DNS name's maximum).
pub const HOST_BYTES_MAX: usize = 253;
/// Longest endpoint protocol label.
pub const PROTOCOL_BYTES_MAX: usize = 32;
/// Most metadata entries in one record.
pub const METADATA_ENTRIES_MAX: usize = 32;
/// Longest metadata key.
pub const METADATA_KEY_BYTES_MAX: usize = 63;
/// Longest metadata value.
pub const METADATA_VALUE_BYTES_MAX: usize = 1024;
/// Largest sum of metadata key and value lengths in one record.
pub const METADATA_BYTES_MAX: usize = 4096;
/// Longest `tls_identity`.
pub const TLS_IDENTITY_BYTES_MAX: usize = 512;
/// Shortest record lease.
pub const TTL_SECS_MIN: u32 = 5;
/// Longest record lease.
pub const TTL_SECS_MAX: u32 = 86_400;
/// Most keys bound to one service.
pub const BINDING_KEYS_MAX: usize = 16;
/// Most keys in an admin set.
pub const ADMIN_KEYS_MAX: usize = 16;
/// Most signatures carried by one multi-signature envelope. Twice the admin set bound leaves room
/// for signatures by keys of a neighbouring set while keeping verification work bounded.
pub const SIGNATURES_MAX: usize = 2 * ADMIN_KEYS_MAX;
/// Most admin set rotations after genesis that a chain may hold.
pub const ADMIN_CHAIN_ENTRIES_MAX: usize = 64;
/// Longest service name.
pub const SERVICE_NAME_BYTES_MAX: usize = 63;
/// Longest instance id.
pub const INSTANCE_ID_BYTES_MAX: usize = 128;
/// Length of an ed25519 public key, which is also the `key_id` of an envelope.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Length of an ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;
