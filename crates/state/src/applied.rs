use serde::{Deserialize, Serialize};
use signpost_record::Reason;

/// The answer to one log entry, returned to the proposer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command changed the state (or was a no-op) at `revision`.
    Applied {
        /// The log index of the entry.
        revision: u64,
    },
    /// The command was refused; the state is unchanged.
    Rejected {
        /// The stable machine-readable code.
        reason: Reason,
        /// What exactly was wrong, for an operator.
        detail: String,
    },
}

/// Whether an instance appeared (or changed) or went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// The instance was registered or replaced.
    Put,
    /// The instance was removed (deregistered, expired or unbound by a key rotation).
    Delete,
}

/// One change of one instance, for watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The log index of the entry that caused it.
    pub revision: u64,
    /// Order among the events of `revision`, from 0: a batched entry can change one instance
    /// twice, so `(revision, position)`, not `(revision, instance)`, names an event.
    #[serde(default)]
    pub position: u32,
    /// Put or delete.
    pub kind: EventKind,
    /// The service name.
    pub service: String,
    /// The instance id.
    pub instance: String,
    /// The encoded signed `Envelope` for [`EventKind::Put`]; `None` for deletes.
    pub record: Option<Vec<u8>>,
    /// For [`EventKind::Put`], the encoded `Envelope` of the binding in force when it was
    /// applied, against which watchers verify the record.
    pub binding: Option<Vec<u8>>,
}

impl Event {
    /// Bytes this event holds, for the byte budgets of histories and buffers.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Event>()
            + self.service.len()
            + self.instance.len()
            + self.record.as_ref().map_or(0, Vec::len)
            + self.binding.as_ref().map_or(0, Vec::len)
    }
}

/// One write to the key/value form of the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key.
    pub key: Vec<u8>,
    /// The new value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
}

/// Everything one apply produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The answer for the proposer.
    pub outcome: Outcome,
    /// The writes that turn the previous export into the new one, in order. Empty when
    /// rejected.
    pub changes: Vec<Change>,
    /// What watchers see, in order. Empty when rejected.
    pub events: Vec<Event>,
    /// The encoded `AuditRecord` of the command, applied or refused: the next leaf of the
    /// audit tree. `None` only for what is not audited (no-ops).
    pub audit: Option<Vec<u8>>,
}
