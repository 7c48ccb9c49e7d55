//! The change feed: a bounded, ordered history of registry events that watchers read from.
//!
//! Model: one feeder task turns the state machine's applied batches into a history ring of
//! events (each carrying the revision, i.e. log index, at which it was applied). Every watcher
//! is a cursor into that history: it copies the events at or after its cursor into its own
//! bounded channel and waits for the next revision when caught up. Watchers never slow apply or
//! each other: the feeder only appends and notifies; a watcher whose channel is full is cancelled
//! with RESOURCE_EXHAUSTED.
//!
//! History is bounded by [`WatchHubConfig::history_events_max`]; a watcher that asks for (or
//! falls behind to) a revision older than the oldest kept gets OUT_OF_RANGE with reason
//! `compacted` and the oldest available revision in `signpost-compacted-revision`, and should
//! resync with a fresh Resolve. A snapshot install on this node clears the history the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use signpost_consensus::{Applied, Consensus};
use signpost_proto::v1::{watch_event, WatchEvent};
use signpost_state::{Event, EventKind};
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::error::REASON_METADATA;

/// Metadata key naming the oldest revision still available after a `compacted` refusal.
pub const COMPACTED_METADATA: &str = "signpost-compacted-revision";

/// Limits of the change feed.
#[derive(Debug, Clone, Copy)]
pub struct WatchHubConfig {
    /// Events kept for resumption.
    pub history_events_max: usize,
    /// Events buffered per watcher before it is cancelled as too slow.
    pub watcher_buffer_events: usize,
    /// Concurrent watchers on this node.
    pub watchers_max: usize,
}

impl Default for WatchHubConfig {
    fn default() -> Self {
        WatchHubConfig {
            history_events_max: 100_000,
            watcher_buffer_events: 1024,
            watchers_max: 20_000,
        }
    }
}

#[derive(Debug)]
struct History {
    events: VecDeque<Event>,
    /// Every event with a revision >= this is in `events` (or has not happened yet).
    oldest_revision: u64,
    /// The last revision the feeder has seen.
    last_revision: u64,
}

impl History {
    fn append(&mut self, revision: u64, events: &[Event], max: usize) {
        self.events.extend(events.iter().cloned());
        self.last_revision = self.last_revision.max(revision);
        while self.events.len() > max {
            if let Some(dropped) = self.events.pop_front() {
                // Everything at the dropped revision is no longer complete.
                self.oldest_revision = self.oldest_revision.max(dropped.revision + 1);
            }
        }
        while self
            .events
            .front()
            .is_some_and(|e| e.revision < self.oldest_revision)
        {
            self.events.pop_front();
        }
    }

    fn reset(&mut self, revision: u64) {
        self.events.clear();
        self.oldest_revision = revision + 1;
        self.last_revision = revision;
    }
}

/// What a watcher asks for.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    /// A service name, or a prefix of names.
    pub service: String,
    /// Match `service` as a prefix.
    pub prefix: bool,
}

impl WatchFilter {
    fn matches(&self, service: &str) -> bool {
        if self.prefix {
            service.starts_with(&self.service)
        } else {
            service == self.service
        }
    }
}

/// The change feed of one node.
#[derive(Debug, Clone)]
pub struct WatchHub {
    history: Arc<Mutex<History>>,
    revision_tx: Arc<watch::Sender<u64>>,
    watchers: Arc<Semaphore>,
    config: WatchHubConfig,
}

fn compacted(oldest: u64, asked: u64) -> Status {
    let mut status = Status::out_of_range(format!(
        "compacted: revision {asked} is no longer available here; the oldest available is \
         {oldest}; resync with Resolve and watch from its revision"
    ));
    status
        .metadata_mut()
        .insert(REASON_METADATA, MetadataValue::from_static("compacted"));
    status
        .metadata_mut()
        .insert(COMPACTED_METADATA, MetadataValue::from(oldest));
    status
}

fn to_proto(event: &Event) -> WatchEvent {
    let record = event
        .record
        .as_ref()
        .and_then(|bytes| signpost_record::decode_envelope(bytes).ok());
    WatchEvent {
        revision: event.revision,
        kind: match event.kind {
            EventKind::Put => watch_event::Kind::Put as i32,
            EventKind::Delete => watch_event::Kind::Delete as i32,
        },
        service: event.service.clone(),
        instance: event.instance.clone(),
        record,
    }
}

impl WatchHub {
    /// Starts the feeder for `consensus`. History starts at the current applied revision.
    pub fn start(consensus: &Consensus, config: WatchHubConfig) -> WatchHub {
        // Subscribe before reading the revision: batches applied in between are then both in
        // the channel and at or below `start`, and are skipped by revision.
        let mut applied = consensus.subscribe();
        let start = consensus.state().revision();
        let history = Arc::new(Mutex::new(History {
            events: VecDeque::new(),
            oldest_revision: start + 1,
            last_revision: start,
        }));
        let (revision_tx, _) = watch::channel(start);
        let hub = WatchHub {
            history,
            revision_tx: Arc::new(revision_tx),
            watchers: Arc::new(Semaphore::new(config.watchers_max)),
            config,
        };
        let feeder = hub.clone();
        let consensus = consensus.clone();
        tokio::spawn(async move {
            loop {
                match applied.recv().await {
                    Ok(batch) => feeder.feed(&batch),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // We lost events: history can no longer promise "no gaps" before now.
                        let revision = consensus.state().revision();
                        tracing::warn!(missed, revision, "watch feeder lagged; history reset");
                        feeder.feed(&Applied::Reset { revision });
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        hub
    }

    fn feed(&self, batch: &Applied) {
        let revision = {
            let mut history = self
                .history
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match batch {
                Applied::Events { revision, events } => {
                    if *revision <= history.last_revision {
                        return;
                    }
                    let fresh: Vec<Event> = events
                        .iter()
                        .filter(|e| e.revision > history.last_revision)
                        .cloned()
                        .collect();
                    history.append(*revision, &fresh, self.config.history_events_max);
                    *revision
                }
                Applied::Reset { revision } => {
                    history.reset(*revision);
                    *revision
                }
            }
        };
        self.revision_tx.send_replace(revision);
    }

    /// The oldest revision a watcher can start from, and the last applied one.
    pub fn bounds(&self) -> (u64, u64) {
        let history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (history.oldest_revision, history.last_revision)
    }

    /// Events matching `filter` with revision >= `from`, at most `max`; or `compacted`.
    fn read(
        &self,
        from: u64,
        filter: &WatchFilter,
        max: usize,
    ) -> Result<(Vec<WatchEvent>, u64), Status> {
        let history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if from < history.oldest_revision {
            return Err(compacted(history.oldest_revision, from));
        }
        let start = history.events.partition_point(|e| e.revision < from);
        let mut out = Vec::new();
        let mut next = history.last_revision + 1;
        for event in history.events.iter().skip(start) {
            if out.len() >= max {
                // Resume exactly here next time; events of one revision may span two reads,
                // so only stop between revisions.
                if out
                    .last()
                    .is_some_and(|last: &WatchEvent| last.revision != event.revision)
                {
                    next = event.revision;
                    break;
                }
            }
            if filter.matches(&event.service) {
                out.push(to_proto(event));
            }
        }
        Ok((out, next))
    }

    /// Opens a watcher from `from` (0 = after the current revision). Returns the receiving
    /// end of its bounded channel; the watcher ends when the receiver is dropped.
    pub fn watch(&self, filter: WatchFilter, from: u64) -> Result<WatchStream, Status> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            crate::error::shed("this node serves its maximum number of watchers", 1_000)
        })?;
        let (oldest, last) = self.bounds();
        let from = if from == 0 { last + 1 } else { from };
        if from < oldest {
            return Err(compacted(oldest, from));
        }
        let (tx, rx) = mpsc::channel(self.config.watcher_buffer_events);
        let cancelled = Arc::new(Mutex::new(None));
        let stream = WatchStream {
            rx,
            cancelled: cancelled.clone(),
            finished: false,
        };
        let hub = self.clone();
        let mut revisions = self.revision_tx.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let mut cursor = from;
            loop {
                let batch = hub.read(cursor, &filter, 256);
                let (events, next) = match batch {
                    Ok(b) => b,
                    Err(status) => {
                        *cancelled
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(status);
                        return;
                    }
                };
                for event in events {
                    match tx.try_send(event) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            // Too slow: cancel rather than buffer without bound or stall others.
                            // The reason is delivered after what is already buffered.
                            let status = Status::resource_exhausted(format!(
                                "watcher too slow: more than {} undelivered events; resume \
                                 from the last revision received",
                                hub.config.watcher_buffer_events
                            ));
                            *cancelled
                                .lock()
                                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(status);
                            return;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                cursor = next;
                // Wait for a newer revision, or for the watcher to go away.
                while *revisions.borrow_and_update() < cursor {
                    tokio::select! {
                        changed = revisions.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Ok(stream)
    }
}

/// The stream of one watcher: its buffered events, then the reason it was cancelled, if any.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<WatchEvent>,
    cancelled: Arc<Mutex<Option<Status>>>,
    finished: bool,
}

impl futures::Stream for WatchStream {
    type Item = Result<WatchEvent, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.finished {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(event)) => std::task::Poll::Ready(Some(Ok(event))),
            std::task::Poll::Ready(None) => {
                self.finished = true;
                let reason = self
                    .cancelled
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                std::task::Poll::Ready(reason.map(Err))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, service: &str, instance: &str) -> Event {
        Event {
            revision,
            kind: EventKind::Put,
            service: service.into(),
            instance: instance.into(),
            record: None,
        }
    }

    #[test]
    fn history_trims_whole_revisions_and_reports_the_oldest_complete_one() {
        let mut history = History {
            events: VecDeque::new(),
            oldest_revision: 1,
            last_revision: 0,
        };
        history.append(
            3,
            &[event(2, "a", "1"), event(3, "a", "2"), event(3, "a", "3")],
            2,
        );
        // Three events, room for two: revision 2 is gone, revision 3 is whole.
        assert_eq!(history.oldest_revision, 3);
        assert_eq!(history.events.len(), 2);
        history.append(4, &[event(4, "b", "1")], 2);
        // Revision 3 lost one of its events, so it is no longer complete.
        assert_eq!(history.oldest_revision, 4);
        assert_eq!(history.events.len(), 1);
        history.reset(10);
        assert_eq!((history.oldest_revision, history.last_revision), (11, 10));
        assert!(history.events.is_empty());
    }

    #[test]
    fn filters_match_exact_names_or_prefixes() {
        let exact = WatchFilter {
            service: "pay".into(),
            prefix: false,
        };
        let prefix = WatchFilter {
            service: "pay".into(),
            prefix: true,
        };
        assert!(exact.matches("pay"));
        assert!(!exact.matches("payments"));
        assert!(prefix.matches("payments"));
        assert!(!prefix.matches("orders"));
    }
}
