//! A resumable watch: events in revision order with no gaps and no duplicates, across the node
//! it is connected to going away, and checked against a node that lies.
//!
//! Every stream opens with a START event naming the revision it starts at, so a watch always
//! has an explicit position, even before its first event: it resumes from there, never from
//! "now". Revisions must not go backwards and may not exceed the answering node's applied
//! revision; each put is verified against the binding in force when it was applied (which the
//! event carries), signed by an admin of the chain this client verified; with `[audit] verify`,
//! each put also carries audit evidence and must be an applied registration in a tree that
//! extends a quorum checkpoint no older than the age limit. A stream that breaks any of these is
//! dropped and the watch resumes from its last good revision on another node.

use std::time::Duration;

use signpost_proto::v1::{watch_event, WatchEvent, WatchRequest};
use tonic::{Code, Streaming};

use crate::audit_trust::Asked;
use crate::client::Client;
use crate::error::ClientError;

/// Consecutive failed (re)connections or refused streams before the watcher gives up.
const RECONNECTS_MAX: u32 = 20;
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// One change, as delivered by [`Watcher::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Revision (log index) at which the change was applied.
    pub revision: u64,
    /// `true` for a put, `false` for a delete.
    pub put: bool,
    /// Order among the events of `revision` (a log entry can change one instance twice).
    pub position: u32,
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
    /// The revision to (re)connect from: the one asked for, then the START of the first
    /// stream, then the last revision delivered (a stream may break between two events of one
    /// revision; what a resumed stream repeats of that revision is dropped).
    resume_from: u64,
    /// `(revision, position)` of the last event delivered: a resumed stream's events at or
    /// before it are duplicates. Not the instance: one revision can change an instance twice.
    last: Option<(u64, u32)>,
    last_revision: u64,
    stream: Option<Streaming<WatchEvent>>,
    /// Whether the current stream's START event has arrived.
    started: bool,
    /// The node serving the current stream, and what the stream asked the audit log to prove
    /// (`None` when the client does not verify it).
    from: String,
    asked: Option<Asked>,
    failures: u32,
}

/// Why a stream is not trusted any further.
enum Broken {
    /// The node lied or served something that does not verify.
    Lied(String),
    /// A transport or server error.
    Failed(ClientError),
}

impl<'a> Watcher<'a> {
    pub(crate) fn new(client: &'a Client, service: &str, prefix: bool, from_revision: u64) -> Self {
        Watcher {
            client,
            service: service.to_string(),
            prefix,
            resume_from: from_revision,
            last: None,
            last_revision: 0,
            stream: None,
            started: false,
            from: String::new(),
            asked: None,
            failures: 0,
        }
    }

    /// The revision of the last event delivered.
    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }

    /// The revision the watch would resume from now: where its first stream started, or its
    /// last revision. 0 only before the first stream has started.
    pub fn position(&self) -> u64 {
        self.resume_from
    }

    async fn open(&mut self) -> Result<(), ClientError> {
        self.client.refresh_admin_sets().await?;
        let asked = self.client.audit_asked();
        let request = WatchRequest {
            service: self.service.clone(),
            prefix: self.prefix,
            from_revision: self.resume_from,
            audit: asked.as_ref().map(Asked::request),
        };
        let (from, stream) = self.client.open_watch(request).await?;
        self.stream = Some(stream);
        self.from = from;
        self.asked = asked;
        self.started = false;
        Ok(())
    }

    /// The next change. Errors are final: `compacted` (resync with resolve), permission, or
    /// no node served a stream that held up after bounded retries.
    pub async fn next(&mut self) -> Result<Change, ClientError> {
        loop {
            if self.stream.is_none() {
                match self.open().await {
                    Ok(()) => {}
                    Err(e) if is_transient(&e) && self.failures < RECONNECTS_MAX => {
                        self.failures += 1;
                        self.client.forget_preferred();
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(stream) = self.stream.as_mut() else {
                continue;
            };
            let broken = match stream.message().await {
                Ok(Some(event)) => match self.accept(event) {
                    Ok(Some(change)) => {
                        self.failures = 0;
                        return Ok(change);
                    }
                    Ok(None) => continue,
                    Err(broken) => broken,
                },
                Ok(None) => Broken::Failed(ClientError::Unavailable("watch stream ended".into())),
                Err(status) => Broken::Failed(ClientError::from_status(&status)),
            };
            self.stream = None;
            self.client.forget_preferred();
            self.failures += 1;
            match broken {
                Broken::Lied(why) => {
                    tracing::warn!(%why, "watch stream not trusted; resuming on another node");
                    if self.failures >= RECONNECTS_MAX {
                        return Err(ClientError::Verification(format!(
                            "watch of {}: {why} (and so on {RECONNECTS_MAX} streams in a row)",
                            self.service
                        )));
                    }
                }
                Broken::Failed(error) => {
                    if !is_transient(&error) || self.failures >= RECONNECTS_MAX {
                        return Err(error);
                    }
                }
            }
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }

    /// Checks one message of the current stream: `Ok(Some)` to deliver, `Ok(None)` to skip
    /// (the START event, a duplicate after a resume), `Err` to drop the stream.
    fn accept(&mut self, event: WatchEvent) -> Result<Option<Change>, Broken> {
        let lied = |why: String| Err(Broken::Lied(why));
        if event.revision > event.applied_revision.saturating_add(1) {
            return lied(format!(
                "event at revision {} beyond the node's applied revision {}",
                event.revision, event.applied_revision
            ));
        }
        let kind =
            watch_event::Kind::try_from(event.kind).unwrap_or(watch_event::Kind::Unspecified);
        if !self.started {
            if kind != watch_event::Kind::Start {
                return lied("the stream did not open with its start revision".into());
            }
            if self.resume_from != 0 && event.revision != self.resume_from {
                return lied(format!(
                    "asked to start at revision {}, the stream starts at {}",
                    self.resume_from, event.revision
                ));
            }
            if event.revision < self.last_revision {
                return lied(format!(
                    "the stream starts at revision {}, before the {} already delivered",
                    event.revision, self.last_revision
                ));
            }
            self.started = true;
            self.resume_from = event.revision;
            return Ok(None);
        }
        let put = match kind {
            watch_event::Kind::Put => true,
            watch_event::Kind::Delete => false,
            other => return lied(format!("unexpected {other:?} event inside a stream")),
        };
        if event.revision < self.resume_from {
            return lied(format!(
                "event at revision {} before the stream's start at {}",
                event.revision, self.resume_from
            ));
        }
        let at = (event.revision, event.position);
        if self.last.is_some_and(|last| at <= last) {
            // Already delivered before a resume.
            return Ok(None);
        }
        if put {
            self.verify_put(&event).map_err(Broken::Lied)?;
        }
        self.last = Some(at);
        self.last_revision = event.revision;
        self.resume_from = event.revision;
        Ok(Some(Change {
            revision: event.revision,
            position: event.position,
            put,
            service: event.service,
            instance: event.instance,
            record: event.record,
        }))
    }

    /// A put's record must verify against the binding in force when it was applied, itself
    /// signed by an admin of the verified chain, and (when the client checks the audit log) be
    /// an applied registration in a tree that extends a quorum checkpoint.
    fn verify_put(&self, event: &WatchEvent) -> Result<(), String> {
        let (Some(record), Some(binding)) = (event.record.as_ref(), event.binding.as_ref()) else {
            return Err(format!(
                "put at revision {} without its record or binding",
                event.revision
            ));
        };
        let binding = self
            .client
            .verify_past_binding(&event.service, binding)
            .map_err(|e| e.to_string())?;
        let verified =
            signpost_record::verify_record_against(&binding, record).map_err(|e| e.to_string())?;
        if verified.payload.instance != event.instance {
            return Err(format!(
                "put of {}/{} carries a record of instance {}",
                event.service, event.instance, verified.payload.instance
            ));
        }
        if let Some(asked) = &self.asked {
            self.client
                .check_watched_put(asked, &self.from, event, &verified)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn is_transient(e: &ClientError) -> bool {
    // A node behind the watch's position says future_revision; another node (or this one a
    // moment later) has it.
    e.reason() == Some("future_revision")
        || matches!(
            e.code(),
            Some(
                Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::Internal
                    | Code::ResourceExhausted
            )
        )
}
