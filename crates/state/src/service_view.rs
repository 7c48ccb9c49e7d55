use signpost_record::PUBLIC_KEY_BYTES;

/// One service as clients see it: the signed binding and the signed records it authorizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    /// The service name.
    pub service: String,
    /// The encoded `Envelope` of the `BindingPayload`.
    pub binding: Vec<u8>,
    /// The encoded `Envelope`s of the live `RecordPayload`s, ordered by instance id.
    pub records: Vec<Vec<u8>>,
    /// For each record, in the same order, its instance id.
    pub instances: Vec<String>,
    /// For each record, in the same order, the revision of the write that stored it: where
    /// its audit leaf is.
    pub revisions: Vec<u64>,
}

/// What the lease tracker needs to know about one live instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceInfo {
    /// The sequence of the stored record.
    pub sequence: u64,
    /// The lease the record asked for.
    pub ttl_secs: u32,
    /// The raw ed25519 public key that signed the record.
    pub key: [u8; PUBLIC_KEY_BYTES],
}
