/// The kinds of signed payload. Each has its own signing context, so a signature made for one
/// kind never verifies as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PayloadKind {
    /// A `RecordPayload`: one instance of a service, signed by a key bound to the service.
    Record,
    /// A `DeregisterPayload`: removal of one instance.
    Deregister,
    /// A `BindingPayload`: which keys may sign for a service, signed by an admin key.
    Binding,
    /// An `AdminSetPayload`: the next admin set, threshold-signed by the current one.
    AdminSet,
}

impl PayloadKind {
    /// The domain-separation context that prefixes the signed message.
    pub fn context(self) -> &'static str {
        match self {
            PayloadKind::Record => "signpost.v1.record",
            PayloadKind::Deregister => "signpost.v1.deregister",
            PayloadKind::Binding => "signpost.v1.binding",
            PayloadKind::AdminSet => "signpost.v1.admin-set",
        }
    }

    /// The exact bytes that are signed: `context ‖ 0x00 ‖ payload`. The zero byte cannot occur
    /// in a context, so no (context, payload) pair can collide with another.
    pub fn signed_message(self, payload: &[u8]) -> Vec<u8> {
        let context = self.context().as_bytes();
        let mut message = Vec::with_capacity(context.len() + 1 + payload.len());
        message.extend_from_slice(context);
        message.push(0);
        message.extend_from_slice(payload);
        message
    }
}
