use serde::{Deserialize, Serialize};
use signpost_record::PUBLIC_KEY_BYTES;

/// One log entry's payload: everything [`crate::Registry::apply`] needs, and nothing it would
/// have to look up elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Milliseconds since the Unix epoch, from the leader's clock when it proposed the entry.
    /// It is the only notion of "now" that apply has.
    pub time_ms: u64,
    /// The verified SPIFFE id of the client that asked for the write. Carried for the audit
    /// trail only; authorization happened at the server edge.
    pub caller: String,
    /// What to do.
    pub command: Command,
}

/// A state machine command.
///
/// Variants are encoded by position in the Raft log: add new ones at the end only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Installs the first admin set (version 1) and the quotas. Refused with
    /// `already_initialized` once an admin set exists.
    Genesis {
        /// Raw ed25519 public keys of the admins.
        admin_keys: Vec<[u8; PUBLIC_KEY_BYTES]>,
        /// How many distinct admins must sign the next admin set.
        admin_threshold: u32,
        /// The limits of this registry, fixed for its lifetime.
        quotas: Quotas,
    },
    /// Adds or replaces one instance: an encoded `Envelope` of a `RecordPayload`, exactly as
    /// received from the client.
    Register {
        /// The encoded envelope.
        envelope: Vec<u8>,
    },
    /// Removes one instance: an encoded `Envelope` of a `DeregisterPayload`, signed by a key
    /// bound to the service or by a current admin.
    Deregister {
        /// The encoded envelope.
        envelope: Vec<u8>,
    },
    /// Binds keys to a service: an encoded `Envelope` of a `BindingPayload`, signed by a
    /// current admin.
    Bind {
        /// The encoded envelope.
        envelope: Vec<u8>,
    },
    /// Replaces the admin set: an encoded `MultiEnvelope` of an `AdminSetPayload`,
    /// threshold-signed by the current admin set, with every binding whose signer leaves the
    /// set re-signed by a key of the new set (`rotation_incomplete` otherwise), so that every
    /// stored binding always verifies against the current admin set.
    RotateAdmins {
        /// The encoded multi-signature envelope.
        envelope: Vec<u8>,
        /// Encoded `Envelope`s of `BindingPayload`s, each signed by a key of the new set, for
        /// a bound service, with a version above its current binding's.
        rebinds: Vec<Vec<u8>>,
    },
    /// Lease expiry, proposed by the leader: removes the instance only if its stored sequence
    /// still equals `sequence`, so a renewal by re-registration that raced the expiry wins.
    Expire {
        /// The service name.
        service: String,
        /// The instance id.
        instance: String,
        /// The sequence the leader saw when the lease ran out.
        sequence: u64,
    },
    /// Does nothing but advance time (tombstones due by `time_ms` are dropped).
    Noop,
    /// Several requests in one log entry, put together by the leader so that one log write
    /// (one fsync on each node) carries them all. [`crate::Registry::apply_entry`] applies them
    /// in order at the entry's revision, each with its own outcome, as if each were an entry
    /// of its own; a genesis or a batch inside a batch is refused as malformed.
    Batch {
        /// The requests, in the order they are applied.
        requests: Vec<Request>,
    },
}

/// Limits of one registry, fixed at genesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quotas {
    /// Most live instances of one service.
    pub instances_per_service_max: u32,
    /// Most services with at least one live instance.
    pub services_max: u32,
    /// Above this many bytes of stored keys and values, registrations that grow the state are
    /// refused (see [`crate::Registry::state_bytes`]).
    pub state_bytes_max: u64,
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            instances_per_service_max: 1024,
            services_max: 10_000,
            state_bytes_max: 256 * 1024 * 1024,
        }
    }
}
