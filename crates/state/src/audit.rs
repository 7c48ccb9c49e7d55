//! The audit record of one applied (or refused) command: a pure function of the log entry and
//! its outcome, so every node builds the same bytes, which are the leaves of the audit tree.

use prost::Message;
use sha2::{Digest, Sha256};
use signpost_proto::v1::{
    audit_record::Op, AdminSetPayload, AuditRecord, BindingPayload, DeregisterPayload,
    RecordPayload,
};

use crate::applied::Outcome;
use crate::request::{Command, Request};

/// Bytes kept of a name a refused command claimed: longer than any valid name, short enough
/// that junk cannot bloat the log.
const CLAIMED_NAME_BYTES_MAX: usize = 256;
/// Bytes kept of a refusal's detail.
const DETAIL_BYTES_MAX: usize = 512;

fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// What the command names, as far as its bytes decode (a refused one may not).
#[derive(Default)]
struct Named {
    service: String,
    instance: String,
    sequence: u64,
    envelope: Vec<u8>,
}

/// The payload a signed envelope carries, decoded as `P`; empty where the bytes do not decode
/// (a refused command's record names what it can).
fn payload_of<P: Message + Default>(envelope: &[u8]) -> P {
    signpost_record::decode_envelope(envelope)
        .ok()
        .and_then(|e| P::decode(&e.payload[..]).ok())
        .unwrap_or_default()
}

impl Named {
    fn signed(service: String, instance: String, sequence: u64, envelope: &[u8]) -> Named {
        Named {
            service,
            instance,
            sequence,
            envelope: envelope.to_vec(),
        }
    }
}

fn named(command: &Command) -> Option<(Op, Named)> {
    let named = match command {
        Command::Genesis { .. } => (Op::Genesis, Named::default()),
        Command::Register { envelope } => {
            let p: RecordPayload = payload_of(envelope);
            let named = Named::signed(p.service, p.instance, p.sequence, envelope);
            (Op::Register, named)
        }
        Command::Deregister { envelope } => {
            let p: DeregisterPayload = payload_of(envelope);
            let named = Named::signed(p.service, p.instance, p.sequence, envelope);
            (Op::Deregister, named)
        }
        Command::Bind { envelope } => {
            let p: BindingPayload = payload_of(envelope);
            let named = Named::signed(p.service, String::new(), p.version, envelope);
            (Op::Bind, named)
        }
        Command::RotateAdmins { envelope, .. } => {
            let version = signpost_record::decode_multi_envelope(envelope)
                .ok()
                .and_then(|m| AdminSetPayload::decode(&m.payload[..]).ok())
                .map_or(0, |p| p.version);
            (
                Op::RotateAdmins,
                Named {
                    sequence: version,
                    envelope: envelope.clone(),
                    ..Named::default()
                },
            )
        }
        Command::Expire {
            service,
            instance,
            sequence,
        } => (
            Op::Expire,
            Named {
                service: service.clone(),
                instance: instance.clone(),
                sequence: *sequence,
                envelope: Vec::new(),
            },
        ),
        // Only a batch nested in a batch gets here (refused as malformed): the top-level one
        // is recorded request by request.
        Command::Batch { .. } => (Op::Unspecified, Named::default()),
        // A no-op changes nothing anyone asked for.
        Command::Noop => return None,
    };
    Some(named)
}

/// The encoded [`AuditRecord`] of `request`, applied at `revision` (its `position`-th request)
/// at `time_ms` with `outcome`, after which the state commitment's root is `state_root`;
/// `None` for what is not audited (no-ops).
pub(crate) fn audit_leaf(
    revision: u64,
    position: u32,
    time_ms: u64,
    request: &Request,
    outcome: &Outcome,
    state_root: &signpost_audit::Hash,
) -> Option<Vec<u8>> {
    let (op, named) = named(&request.command)?;
    let (applied, reason, detail) = match outcome {
        Outcome::Applied { .. } => (true, String::new(), String::new()),
        Outcome::Rejected { reason, detail } => (
            false,
            reason.as_str().to_owned(),
            truncated(detail, DETAIL_BYTES_MAX),
        ),
    };
    let envelope_sha256 = if named.envelope.is_empty() {
        Vec::new()
    } else {
        Sha256::digest(&named.envelope).to_vec()
    };
    let record = AuditRecord {
        revision,
        position,
        time_ms,
        caller: truncated(&request.caller, CLAIMED_NAME_BYTES_MAX),
        op: op as i32,
        service: truncated(&named.service, CLAIMED_NAME_BYTES_MAX),
        instance: truncated(&named.instance, CLAIMED_NAME_BYTES_MAX),
        applied,
        reason,
        detail,
        envelope_sha256,
        sequence: named.sequence,
        state_root: state_root.to_vec(),
    };
    Some(record.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_claims_are_cut_at_a_character_boundary() {
        let name = "é".repeat(200);
        let cut = truncated(&name, 255);
        assert_eq!(cut.len(), 254);
        assert!(name.starts_with(&cut));
        assert_eq!(truncated("short", 255), "short");
    }
}
