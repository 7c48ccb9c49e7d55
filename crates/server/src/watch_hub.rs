//! The change feed: a bounded, ordered history of registry events that watchers read from.
//!
//! Model: one feeder task turns the state machine's applied batches into a history ring of
//! events (each carrying the revision, i.e. log index, at which it was applied). Every watcher
//! is a cursor into that history: it copies the events at or after its cursor into its own
//! bounded buffer and waits for the next revision when caught up. Watchers never slow apply or
//! each other: the feeder only appends and notifies; a watcher whose buffer is full is cancelled
//! with RESOURCE_EXHAUSTED, and its buffered events are freed at once (a client that stopped
//! reading must not keep them alive).
//!
//! Every stream starts with a START event naming its first revision (the one asked for, or
//! the one after the node's applied revision when the client asked for "now"), so a client
//! always knows exactly where it can resume. Every event carries the node's applied revision,
//! and a start beyond it is refused with OUT_OF_RANGE and reason `future_revision` rather than
//! waited for.
//!
//! Memory is bounded in bytes, not only in counts: the history by
//! [`WatchHubConfig::history_bytes_max`], each watcher's buffer by
//! [`WatchHubConfig::watcher_buffer_bytes`], and all buffers of the node together by
//! [`WatchHubConfig::watch_buffers_bytes_max`]; an identity can hold at most its
//! `watchers_per_identity_max` buffers (admission). Reading history costs the reader read
//! tokens (the pacer the service passes in): a reader out of tokens is slowed, not served free.
//!
//! A watcher that asks for (or falls behind to) a revision older than the oldest kept gets
//! OUT_OF_RANGE with reason `compacted` and the oldest available revision in
//! `signpost-compacted-revision`, and should resync with a fresh Resolve. A snapshot install on
//! this node clears the history the same way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use signpost_consensus::{Applied, Consensus};
use signpost_proto::v1::{watch_event, WatchEvent};
use signpost_state::{Event, EventKind};
use tokio::sync::{broadcast, watch, Notify, Semaphore};
use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::error::REASON_METADATA;

/// Metadata key naming the oldest revision still available after a `compacted` refusal.
pub const COMPACTED_METADATA: &str = signpost_proto::wire::COMPACTED_REVISION;

/// Events one read of the history copies at most, between two pacer calls.
const READ_EVENTS_MAX: usize = 256;

/// Limits of the change feed.
#[derive(Debug, Clone, Copy)]
pub struct WatchHubConfig {
    /// Events kept for resumption.
    pub history_events_max: usize,
    /// Bytes of events kept for resumption.
    pub history_bytes_max: usize,
    /// Events buffered per watcher before it is cancelled as too slow.
    pub watcher_buffer_events: usize,
    /// Bytes buffered per watcher before it is cancelled as too slow.
    pub watcher_buffer_bytes: usize,
    /// Bytes buffered by all watchers of the node together.
    pub watch_buffers_bytes_max: usize,
    /// Concurrent watchers on this node.
    pub watchers_max: usize,
}

impl Default for WatchHubConfig {
    fn default() -> Self {
        WatchHubConfig {
            history_events_max: 100_000,
            history_bytes_max: 64 * 1024 * 1024,
            watcher_buffer_events: 1024,
            watcher_buffer_bytes: 1024 * 1024,
            watch_buffers_bytes_max: 256 * 1024 * 1024,
            watchers_max: 20_000,
        }
    }
}

#[derive(Debug)]
struct History {
    events: VecDeque<Event>,
    /// Sum of [`Event::size_bytes`] over `events`.
    bytes: usize,
    /// Every event with a revision >= this is in `events` (or has not happened yet).
    oldest_revision: u64,
    /// The last revision the feeder has seen.
    last_revision: u64,
}

impl History {
    fn append(&mut self, revision: u64, events: &[Event], events_max: usize, bytes_max: usize) {
        for event in events {
            self.bytes += event.size_bytes();
            self.events.push_back(event.clone());
        }
        self.last_revision = self.last_revision.max(revision);
        while self.events.len() > events_max || self.bytes > bytes_max {
            let Some(dropped) = self.events.pop_front() else {
                break;
            };
            self.bytes -= dropped.size_bytes();
            // Everything at the dropped revision is no longer complete.
            self.oldest_revision = self.oldest_revision.max(dropped.revision + 1);
        }
        while self
            .events
            .front()
            .is_some_and(|e| e.revision < self.oldest_revision)
        {
            if let Some(dropped) = self.events.pop_front() {
                self.bytes -= dropped.size_bytes();
            }
        }
    }

    fn reset(&mut self, revision: u64) {
        self.events.clear();
        self.bytes = 0;
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

/// Called with the number of events a watcher just read from the history; returns how long
/// the watcher must pause before reading more (the reader's token debt).
pub type Pacer = Box<dyn Fn(usize) -> Duration + Send + Sync>;

/// The change feed of one node.
#[derive(Debug, Clone)]
pub struct WatchHub {
    history: Arc<Mutex<History>>,
    revision_tx: Arc<watch::Sender<u64>>,
    watchers: Arc<Semaphore>,
    /// Bytes buffered by all watchers.
    buffered: Arc<AtomicUsize>,
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

fn future(applied: u64, asked: u64) -> Status {
    let mut status = Status::out_of_range(format!(
        "future_revision: revision {asked} is beyond this node's applied revision {applied}; \
         retry later or on another node"
    ));
    status.metadata_mut().insert(
        REASON_METADATA,
        MetadataValue::from_static("future_revision"),
    );
    status
}

fn to_proto(event: &Event, applied_revision: u64) -> WatchEvent {
    let decode = |bytes: &Option<Vec<u8>>| {
        bytes
            .as_ref()
            .and_then(|bytes| signpost_record::decode_envelope(bytes).ok())
    };
    WatchEvent {
        revision: event.revision,
        kind: match event.kind {
            EventKind::Put => watch_event::Kind::Put as i32,
            EventKind::Delete => watch_event::Kind::Delete as i32,
        },
        service: event.service.clone(),
        instance: event.instance.clone(),
        record: decode(&event.record),
        binding: decode(&event.binding),
        applied_revision,
        position: event.position,
        // Proofs are per stream (see RegistryService::watch), not per hub event.
        audit: None,
        inclusion: None,
    }
}

fn start_event(from: u64, applied_revision: u64) -> WatchEvent {
    WatchEvent {
        revision: from,
        kind: watch_event::Kind::Start as i32,
        applied_revision,
        ..WatchEvent::default()
    }
}

impl WatchHub {
    /// Starts the feeder for `consensus`. History starts at the current applied revision.
    pub fn start(consensus: &Consensus, config: WatchHubConfig) -> WatchHub {
        // Subscribe before reading the revision: batches applied in between are then both in
        // the channel and at or below `start`, and are skipped by revision.
        let mut applied = consensus.subscribe();
        let start = consensus.state().revision();
        let hub = WatchHub::with_start(start, config);
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

    fn with_start(start: u64, config: WatchHubConfig) -> WatchHub {
        let history = Arc::new(Mutex::new(History {
            events: VecDeque::new(),
            bytes: 0,
            oldest_revision: start + 1,
            last_revision: start,
        }));
        let (revision_tx, _) = watch::channel(start);
        WatchHub {
            history,
            revision_tx: Arc::new(revision_tx),
            watchers: Arc::new(Semaphore::new(config.watchers_max)),
            buffered: Arc::new(AtomicUsize::new(0)),
            config,
        }
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
                    history.append(
                        *revision,
                        &fresh,
                        self.config.history_events_max,
                        self.config.history_bytes_max,
                    );
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

    /// Open watchers on this node.
    pub fn watchers(&self) -> usize {
        self.config
            .watchers_max
            .saturating_sub(self.watchers.available_permits())
    }

    /// Bytes held by the history and by all watcher buffers.
    pub fn bytes(&self) -> (usize, usize) {
        let history = self
            .history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .bytes;
        (history, self.buffered.load(Ordering::Acquire))
    }

    /// Events matching `filter` with revision >= `from`, at most about `max` (whole
    /// revisions), with the revision to read from next; or `compacted`. Also returns how many
    /// events were examined, which is what the reader is charged for.
    fn read(
        &self,
        from: u64,
        filter: &WatchFilter,
        max: usize,
    ) -> Result<(Vec<WatchEvent>, u64, usize), Status> {
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
        let mut examined = 0usize;
        let mut last_examined: Option<u64> = None;
        for event in history.events.iter().skip(start) {
            // Stop only between revisions, so events of one revision are never split.
            if examined >= max && last_examined != Some(event.revision) {
                next = event.revision;
                break;
            }
            examined += 1;
            last_examined = Some(event.revision);
            if filter.matches(&event.service) {
                out.push(to_proto(event, history.last_revision));
            }
        }
        Ok((out, next, examined))
    }

    /// Opens a watcher from `from` (0 = after the current revision): first a START event,
    /// then the events. `pace` is charged for every event read from the history. The watcher
    /// ends when the returned stream is dropped.
    pub fn watch(
        &self,
        filter: WatchFilter,
        from: u64,
        pace: Pacer,
    ) -> Result<WatchStream, Status> {
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            crate::error::shed(
                "watchers",
                "this node serves its maximum number of watchers",
                1_000,
            )
        })?;
        let (oldest, last) = self.bounds();
        let from = if from == 0 { last + 1 } else { from };
        if from < oldest {
            return Err(compacted(oldest, from));
        }
        if from > last + 1 {
            return Err(future(last, from));
        }
        let buffer = Arc::new(Buffer {
            inner: Mutex::new(BufferInner::default()),
            closed: Notify::new(),
            node_bytes: Arc::clone(&self.buffered),
            limits: self.config,
        });
        buffer.push(start_event(from, last))?;
        let stream = WatchStream {
            buffer: Arc::clone(&buffer),
            finished: false,
        };
        let hub = self.clone();
        let mut revisions = self.revision_tx.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let mut cursor = from;
            loop {
                let (events, next, examined) = match hub.read(cursor, &filter, READ_EVENTS_MAX) {
                    Ok(read) => read,
                    Err(status) => {
                        buffer.cancel(status);
                        return;
                    }
                };
                for event in events {
                    if let Err(status) = buffer.push(event) {
                        buffer.cancel(status);
                        return;
                    }
                }
                cursor = next;
                let pause = pace(examined);
                if !pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = buffer.closed.notified() => return,
                    }
                }
                // Wait for a newer revision, or for the watcher to go away.
                while *revisions.borrow_and_update() < cursor {
                    tokio::select! {
                        changed = revisions.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        _ = buffer.closed.notified() => return,
                    }
                }
                if buffer.is_closed() {
                    return;
                }
            }
        });
        Ok(stream)
    }
}

/// One watcher's buffer, shared by its feeding task and its stream. Unlike a channel, the
/// feeding side can empty it when it cancels the watcher, so a client that stopped reading
/// does not keep a full buffer alive.
#[derive(Debug)]
struct Buffer {
    inner: Mutex<BufferInner>,
    /// Signalled when the stream is dropped.
    closed: Notify,
    node_bytes: Arc<AtomicUsize>,
    limits: WatchHubConfig,
}

#[derive(Debug, Default)]
struct BufferInner {
    events: VecDeque<(WatchEvent, usize)>,
    bytes: usize,
    cancelled: Option<Status>,
    closed: bool,
    waker: Option<Waker>,
}

impl Buffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, BufferInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds an event, or says why the watcher must be cancelled (too slow: its own budget or
    /// the node's is used up).
    fn push(&self, event: WatchEvent) -> Result<(), Status> {
        let size = prost::Message::encoded_len(&event) + std::mem::size_of::<WatchEvent>();
        let mut inner = self.lock();
        if inner.closed {
            return Ok(());
        }
        if inner.events.len() >= self.limits.watcher_buffer_events
            || inner.bytes + size > self.limits.watcher_buffer_bytes
        {
            return Err(too_slow(format!(
                "more than {} undelivered events or {} undelivered bytes",
                self.limits.watcher_buffer_events, self.limits.watcher_buffer_bytes
            )));
        }
        let taken = self
            .node_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n + size <= self.limits.watch_buffers_bytes_max).then_some(n + size)
            });
        if taken.is_err() {
            return Err(too_slow(format!(
                "the watchers of this node buffer their maximum of {} bytes",
                self.limits.watch_buffers_bytes_max
            )));
        }
        inner.bytes += size;
        inner.events.push_back((event, size));
        if let Some(waker) = inner.waker.take() {
            waker.wake();
        }
        Ok(())
    }

    /// Ends the watcher with `status`, freeing what it buffered: the client learns at once,
    /// and resumes from the last revision it received.
    fn cancel(&self, status: Status) {
        let mut inner = self.lock();
        let freed = inner.bytes;
        inner.events.clear();
        inner.bytes = 0;
        self.node_bytes.fetch_sub(freed, Ordering::AcqRel);
        inner.cancelled = Some(status);
        if let Some(waker) = inner.waker.take() {
            waker.wake();
        }
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

fn too_slow(detail: String) -> Status {
    Status::resource_exhausted(format!(
        "watcher too slow: {detail}; resume from the last revision received"
    ))
}

/// The stream of one watcher: its START event, its buffered events, then the reason it was
/// cancelled, if any.
#[derive(Debug)]
pub struct WatchStream {
    buffer: Arc<Buffer>,
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
        let mut inner = self.buffer.lock();
        if let Some((event, size)) = inner.events.pop_front() {
            inner.bytes -= size;
            self.buffer.node_bytes.fetch_sub(size, Ordering::AcqRel);
            return std::task::Poll::Ready(Some(Ok(event)));
        }
        if let Some(status) = inner.cancelled.take() {
            drop(inner);
            self.finished = true;
            return std::task::Poll::Ready(Some(Err(status)));
        }
        inner.waker = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut inner = self.buffer.lock();
        inner.closed = true;
        let freed = inner.bytes;
        inner.events.clear();
        inner.bytes = 0;
        self.buffer.node_bytes.fetch_sub(freed, Ordering::AcqRel);
        drop(inner);
        // notify_one keeps a permit if the task is not waiting yet, so it cannot miss this.
        self.buffer.closed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64, service: &str, instance: &str) -> Event {
        Event {
            revision,
            position: 0,
            kind: EventKind::Put,
            service: service.into(),
            instance: instance.into(),
            record: None,
            binding: None,
        }
    }

    #[test]
    fn history_trims_whole_revisions_and_reports_the_oldest_complete_one() {
        let mut history = History {
            events: VecDeque::new(),
            bytes: 0,
            oldest_revision: 1,
            last_revision: 0,
        };
        history.append(
            3,
            &[event(2, "a", "1"), event(3, "a", "2"), event(3, "a", "3")],
            2,
            usize::MAX,
        );
        // Three events, room for two: revision 2 is gone, revision 3 is whole.
        assert_eq!(history.oldest_revision, 3);
        assert_eq!(history.events.len(), 2);
        history.append(4, &[event(4, "b", "1")], 2, usize::MAX);
        // Revision 3 lost one of its events, so it is no longer complete.
        assert_eq!(history.oldest_revision, 4);
        assert_eq!(history.events.len(), 1);
        history.reset(10);
        assert_eq!((history.oldest_revision, history.last_revision), (11, 10));
        assert!(history.events.is_empty());
    }

    fn big_event(revision: u64, instance: &str) -> Event {
        let envelope = signpost_proto::v1::Envelope {
            payload: vec![7; 8000],
            key_id: vec![1; 32],
            signature: vec![2; 64],
        };
        Event {
            record: Some(prost::Message::encode_to_vec(&envelope)),
            ..event(revision, "svc", instance)
        }
    }

    fn feed_events(hub: &WatchHub, events: Vec<Event>) {
        let revision = events.last().map_or(0, |e| e.revision);
        hub.feed(&Applied::Events { revision, events });
    }

    fn all() -> WatchFilter {
        WatchFilter {
            service: String::new(),
            prefix: true,
        }
    }

    #[test]
    fn history_is_bounded_in_bytes_as_well_as_in_events() {
        let mut history = History {
            events: VecDeque::new(),
            bytes: 0,
            oldest_revision: 1,
            last_revision: 0,
        };
        let one = big_event(1, "a").size_bytes();
        let events: Vec<Event> = (1..=10).map(|r| big_event(r, "a")).collect();
        history.append(10, &events, 1_000, 3 * one);
        assert_eq!(history.events.len(), 3);
        assert!(history.bytes <= 3 * one);
        assert_eq!(history.oldest_revision, 8);
    }

    #[tokio::test]
    async fn a_watcher_that_never_reads_is_cancelled_at_its_byte_budget_and_freed() {
        use futures::StreamExt;
        let config = WatchHubConfig {
            watcher_buffer_bytes: 40 * 1024,
            ..WatchHubConfig::default()
        };
        let hub = WatchHub::with_start(0, config);
        let mut stream = hub.watch(all(), 1, Box::new(|_| Duration::ZERO)).unwrap();

        eprintln!("phase: 20 events of 8 KiB pass the 40 KiB budget of a watcher that never reads");
        feed_events(&hub, (1..=20).map(|r| big_event(r, "a")).collect());
        for _ in 0..100 {
            if hub.bytes().1 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hub.bytes().1, 0, "the cancelled watcher's buffer was freed");

        eprintln!("phase: the client then learns at once that it was too slow");
        let first = stream.next().await.unwrap().unwrap_err();
        assert_eq!(first.code(), tonic::Code::ResourceExhausted);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_watcher_within_its_budget_gets_start_then_every_event_in_order() {
        use futures::StreamExt;
        let hub = WatchHub::with_start(0, WatchHubConfig::default());
        feed_events(&hub, (1..=3).map(|r| big_event(r, "a")).collect());
        let charged = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&charged);
        let pace: Pacer = Box::new(move |n| {
            counter.fetch_add(n, Ordering::AcqRel);
            Duration::ZERO
        });
        let mut stream = hub.watch(all(), 2, pace).unwrap();
        let start = stream.next().await.unwrap().unwrap();
        assert_eq!(start.kind, watch_event::Kind::Start as i32);
        assert_eq!((start.revision, start.applied_revision), (2, 3));
        for revision in [2, 3] {
            let event = stream.next().await.unwrap().unwrap();
            assert_eq!(event.revision, revision);
            assert_eq!(event.applied_revision, 3);
        }
        assert_eq!(
            charged.load(Ordering::Acquire),
            2,
            "history reads are charged"
        );
        assert!(hub.bytes().1 < 1024, "delivered events leave the buffer");
    }

    #[tokio::test]
    async fn a_start_beyond_the_applied_revision_is_refused_and_now_is_named() {
        let hub = WatchHub::with_start(5, WatchHubConfig::default());
        let err = hub
            .watch(all(), 7, Box::new(|_| Duration::ZERO))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(
            err.message().starts_with("future_revision"),
            "{}",
            err.message()
        );
        let next = hub.watch(all(), 6, Box::new(|_| Duration::ZERO));
        assert!(next.is_ok(), "the next revision is fine: it is waited for");
        use futures::StreamExt;
        let mut now = hub.watch(all(), 0, Box::new(|_| Duration::ZERO)).unwrap();
        let start = now.next().await.unwrap().unwrap();
        assert_eq!((start.revision, start.applied_revision), (6, 5));
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
