//! A resumable watch: events in revision order with no gaps and no duplicates, across the node
//! it is connected to going away.

use std::time::Duration;

use signpost_proto::v1::{watch_event, WatchEvent, WatchRequest};
use tonic::{Code, Streaming};

use std::collections::HashMap;

use signpost_record::Binding;

use crate::client::Client;
use crate::error::ClientError;

/// Consecutive failed (re)connections before the watcher gives up.
const RECONNECTS_MAX: u32 = 20;
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// One change, as delivered by [`Watcher::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Revision (log index) at which the change was applied.
    pub revision: u64,
    /// `true` for a put, `false` for a delete.
    pub put: bool,
    /// Service name.
    pub service: String,
    /// Instance id.
    pub instance: String,
    /// The signed record of a put.
    pub record: Option<signpost_proto::v1::Envelope>,
}

/// A watch that survives node failures by resuming from its last revision on another node.
#[derive(Debug)]
pub struct Watcher<'a> {
    client: &'a Client,
    service: String,
    prefix: bool,
    /// Next revision to ask for when (re)connecting; 0 = "from now" until the first event.
    resume_from: u64,
    /// Events already delivered at revision `resume_from - 1`... kept to drop duplicates when a
    /// stream broke in the middle of a revision.
    seen_at_last: Vec<(bool, String, String)>,
    last_revision: u64,
    stream: Option<Streaming<WatchEvent>>,
    failures: u32,
    /// Verified bindings by service, to check each put end to end.
    bindings: HashMap<String, Binding>,
}

impl<'a> Watcher<'a> {
    pub(crate) fn new(client: &'a Client, service: &str, prefix: bool, from_revision: u64) -> Self {
        Watcher {
            client,
            service: service.to_string(),
            prefix,
            resume_from: from_revision,
            seen_at_last: Vec::new(),
            last_revision: 0,
            stream: None,
            failures: 0,
            bindings: HashMap::new(),
        }
    }

    /// The revision of the last event delivered.
    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        // Resume at the last revision itself: a stream may have broken between two events of
        // one revision; duplicates of that revision are dropped below.
        let from = if self.last_revision > 0 {
            self.last_revision
        } else {
            self.resume_from
        };
        let request = WatchRequest {
            service: self.service.clone(),
            prefix: self.prefix,
            from_revision: from,
        };
        let stream = self.client.open_watch(request).await?;
        self.stream = Some(stream);
        Ok(())
    }

    /// The next change. Errors are final: `compacted` (resync with resolve), permission, or
    /// no node reachable after bounded retries.
    pub async fn next(&mut self) -> Result<Change, ClientError> {
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(()) => {}
                    Err(e) if is_transient(&e) && self.failures < RECONNECTS_MAX => {
                        self.failures += 1;
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            match stream.message().await {
                Ok(Some(event)) => {
                    let put = event.kind == watch_event::Kind::Put as i32;
                    if put && !self.verify(&event).await {
                        // A node that serves a record which does not verify is not trusted for
                        // the rest of this stream: resume from the last good revision elsewhere.
                        tracing::warn!(revision = event.revision, service = %event.service, "dropping a watched record that failed verification; switching node");
                        self.stream = None;
                        self.client.forget_preferred();
                        self.failures += 1;
                        if self.failures >= RECONNECTS_MAX {
                            return Err(ClientError::Verification(format!(
                                "watched records of {} failed verification on every node tried",
                                event.service
                            )));
                        }
                        continue;
                    }
                    self.failures = 0;
                    let identity = (put, event.service.clone(), event.instance.clone());
                    if event.revision < self.last_revision
                        || (event.revision == self.last_revision
                            && self.seen_at_last.contains(&identity))
                    {
                        continue;
                    }
                    if event.revision > self.last_revision {
                        self.seen_at_last.clear();
                        self.last_revision = event.revision;
                    }
                    self.seen_at_last.push(identity);
                    return Ok(Change {
                        revision: event.revision,
                        put,
                        service: event.service,
                        instance: event.instance,
                        record: event.record,
                    });
                }
                Ok(None) => {
                    self.stream = None;
                    self.client.forget_preferred();
                }
                Err(status) => {
                    let error = ClientError::from_status(&status);
                    self.stream = None;
                    if is_transient(&error) && self.failures < RECONNECTS_MAX {
                        self.failures += 1;
                        self.client.forget_preferred();
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    } else {
                        return Err(error);
                    }
                }
            }
        }
    }
}

impl Watcher<'_> {
    /// Verifies a put against the service's binding, refreshing the binding once (it may have
    /// been rotated since it was cached).
    async fn verify(&mut self, event: &WatchEvent) -> bool {
        let Some(record) = event.record.as_ref() else {
            return false;
        };
        for refresh in [false, true] {
            if refresh || !self.bindings.contains_key(&event.service) {
                match self.client.resolve(&event.service, false).await {
                    Ok(resolved) => {
                        self.bindings
                            .insert(event.service.clone(), resolved.binding);
                    }
                    // Gone again already (deleted later): a verified binding is still needed.
                    Err(_) => return false,
                }
            }
            if let Some(binding) = self.bindings.get(&event.service) {
                if signpost_record::verify_record_against(binding, record).is_ok_and(|r| {
                    r.payload.service == event.service && r.payload.instance == event.instance
                }) {
                    return true;
                }
            }
        }
        false
    }
}

fn is_transient(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Internal
        )
    )
}
