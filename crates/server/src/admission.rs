//! Admission control: who may put work on this node, and how much, before anything reaches
//! Raft.
//!
//! # Model
//!
//! Every client RPC passes, in order of cost: the size limit at decode (tonic), the identity
//! from the verified certificate ([`Caller`]), then [`Admission::admit`]: a per-identity token
//! bucket for its class of work (writes, reads, stream opens) and, for reads, a node-wide
//! bound on reads in progress. Only then does a write pay for its signature pre-check, and
//! only after that does it take a proposal slot ([`Admission::proposal`]).
//!
//! Nothing here queues: a request beyond a limit is answered at once with RESOURCE_EXHAUSTED
//! and a `retry-after-ms` hint (the time until the identity's bucket has a token again, or a
//! short fixed pause when the node is full), so memory never grows with the offered load.
//!
//! Proposal slots are shared by priority. With `N = proposals_in_flight_max`:
//! - an admin may use all `N` slots, so `proposals_admin_reserved` of them are always left for
//!   admins (a flood cannot lock operators out);
//! - renewals of existing instances and deregistrations ([`WriteClass::Maintain`]) may use
//!   `N - reserved`;
//! - new registrations may use only `proposals_new_percent` of that, so a flood of new names
//!   always leaves room for the services that are already registered to stay registered.
//!
//! Buckets are kept per identity in a bounded map: idle identities (no open streams, not seen
//! for `identity_idle_ms`) are evicted when the map is full, and if it is still full the new
//! identity is shed (admins excepted), so a holder of many certificates cannot grow memory.
//!
//! Streams (watch, keep-alive) are counted per identity and node-wide by [`StreamPermit`]s,
//! which give their slot back when dropped with the stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tonic::Status;

use crate::authz::Caller;
use crate::config::LimitsConfig;
use crate::error::shed;

/// Retry hint when the node (not the caller's bucket) is full: about one proposal round.
const NODE_FULL_RETRY_AFTER_MS: u64 = 20;
/// Retry hint when the identity table is full of active identities.
const TABLE_FULL_RETRY_AFTER_MS: u64 = 1_000;
/// Records of a List answer that cost one read token beyond the first: a big answer costs the
/// node more than a resolve, so it costs the caller more too.
const LIST_RECORDS_PER_TOKEN: usize = 64;
/// Services a List page may hold per read token, charged before the page is built.
pub const LIST_SERVICES_PER_TOKEN: usize = 10;
/// Watch events read from the history per read token: replay is a read like any other.
pub const WATCH_EVENTS_PER_TOKEN: usize = 64;
/// Lease renewals per read token: a renewal is a map update on the leader, not a Raft write.
pub const KEEPALIVES_PER_TOKEN: usize = 16;
/// Longest retry hint given for an empty bucket (a zero rate would otherwise say "never").
const RETRY_AFTER_MAX_MS: u64 = 10_000;

/// The class of a client request, for its identity's token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Register, deregister, bind, rotate admins.
    Write,
    /// Resolve, list, status.
    Read,
    /// Opening a watch or keep-alive stream.
    Stream,
}

/// The priority of a proposal (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteClass {
    /// Any write by an admin: may use the reserved share.
    Admin,
    /// Renewal of an existing instance, keep-alive, deregistration: ahead of new registrations.
    Maintain,
    /// Registration of an instance that does not exist yet.
    New,
}

/// The kind of a long-lived stream, each with its own per-identity maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A Watch stream.
    Watch,
    /// A KeepAlive stream.
    KeepAlive,
}

/// The admission limits of one node, from `[limits]` of its config.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Writes per second per identity (sustained) and burst.
    pub writes_per_sec: f64,
    /// Burst of writes per identity.
    pub writes_burst: f64,
    /// Reads per second per identity.
    pub reads_per_sec: f64,
    /// Burst of reads per identity.
    pub reads_burst: f64,
    /// Stream opens per second per identity.
    pub stream_opens_per_sec: f64,
    /// Burst of stream opens per identity.
    pub stream_opens_burst: f64,
    /// Reads being served at once on this node.
    pub reads_in_flight_max: usize,
    /// Proposals in flight to Raft from this node.
    pub proposals_in_flight_max: usize,
    /// Proposal slots only admins may use.
    pub proposals_admin_reserved: usize,
    /// Percent of the non-admin proposal slots new registrations may use.
    pub proposals_new_percent: usize,
    /// Open watch streams per identity.
    pub watchers_per_identity_max: usize,
    /// Open keep-alive streams per identity.
    pub keepalives_per_identity_max: usize,
    /// Open streams of all identities on this node.
    pub streams_max: usize,
    /// Identities whose buckets are tracked at once.
    pub identities_max: usize,
    /// An identity unseen this long (and without open streams) may be evicted.
    pub identity_idle: Duration,
}

impl AdmissionLimits {
    /// The admission part of the `[limits]` config section.
    pub fn from_config(limits: &LimitsConfig) -> AdmissionLimits {
        AdmissionLimits {
            writes_per_sec: f64::from(limits.writes_per_identity_per_sec),
            writes_burst: f64::from(limits.writes_per_identity_burst.max(1)),
            reads_per_sec: f64::from(limits.reads_per_identity_per_sec),
            reads_burst: f64::from(limits.reads_per_identity_burst.max(1)),
            stream_opens_per_sec: f64::from(limits.stream_opens_per_identity_per_sec),
            stream_opens_burst: f64::from(limits.stream_opens_per_identity_burst.max(1)),
            reads_in_flight_max: limits.reads_in_flight_max,
            proposals_in_flight_max: limits.proposals_in_flight_max,
            proposals_admin_reserved: limits.proposals_admin_reserved,
            proposals_new_percent: limits.proposals_new_registration_percent.min(100),
            watchers_per_identity_max: limits.watchers_per_identity_max,
            keepalives_per_identity_max: limits.keepalives_per_identity_max,
            streams_max: limits.streams_max,
            identities_max: limits.identities_tracked_max.max(1),
            identity_idle: Duration::from_millis(limits.identity_idle_ms),
        }
    }
}

/// A token bucket: `tokens` refills at `rate` per second up to `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            refilled: now,
        }
    }

    /// Takes `tokens` whether or not they are there, down to a debt of `burst`.
    fn charge(&mut self, now: Instant, rate: f64, burst: f64, tokens: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = ((self.tokens + elapsed * rate).min(burst) - tokens).max(-burst);
        self.refilled = now;
    }

    /// How long until the bucket is out of debt.
    fn debt(&self, rate: f64) -> Duration {
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        if rate <= 0.0 {
            return Duration::from_millis(RETRY_AFTER_MAX_MS);
        }
        Duration::from_secs_f64(-self.tokens / rate).min(Duration::from_millis(RETRY_AFTER_MAX_MS))
    }

    /// Takes one token, or says in how many milliseconds one will be there.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(RETRY_AFTER_MAX_MS);
        }
        let wait_ms = ((1.0 - self.tokens) / rate * 1000.0).ceil() as u64;
        Err(wait_ms.clamp(1, RETRY_AFTER_MAX_MS))
    }
}

/// What is tracked per identity.
#[derive(Debug)]
struct IdentityState {
    writes: Bucket,
    reads: Bucket,
    stream_opens: Bucket,
    watchers: usize,
    keepalives: usize,
    seen: Instant,
}

impl IdentityState {
    fn new(limits: &AdmissionLimits, now: Instant) -> IdentityState {
        IdentityState {
            writes: Bucket::full(limits.writes_burst, now),
            reads: Bucket::full(limits.reads_burst, now),
            stream_opens: Bucket::full(limits.stream_opens_burst, now),
            watchers: 0,
            keepalives: 0,
            seen: now,
        }
    }

    fn idle(&self, now: Instant, idle: Duration) -> bool {
        self.watchers == 0
            && self.keepalives == 0
            && now.saturating_duration_since(self.seen) >= idle
    }
}

#[derive(Debug)]
struct Inner {
    limits: AdmissionLimits,
    identities: Mutex<HashMap<String, IdentityState>>,
    proposals: AtomicUsize,
    reads: AtomicUsize,
    streams: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, IdentityState>> {
        // Plain counters and buckets: a panic while holding the lock leaves nothing that a
        // later caller could misread as more budget than configured.
        self.identities
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Admission control of one node. Cheap to clone; clones share all counters.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// Admission of one request; holds a read slot, if the request took one, until dropped.
#[derive(Debug)]
#[must_use = "the slot is given back when this is dropped"]
pub struct Admitted {
    _read: Option<CounterSlot>,
}

/// One proposal slot, given back when dropped (after the proposal's outcome is known).
#[derive(Debug)]
#[must_use = "the slot is given back when this is dropped"]
pub struct ProposalPermit {
    _slot: CounterSlot,
}

/// One open stream of an identity, given back when dropped with the stream.
#[derive(Debug)]
#[must_use = "the stream slot is given back when this is dropped"]
pub struct StreamPermit {
    _node: CounterSlot,
    inner: Arc<Inner>,
    identity: String,
    kind: StreamKind,
}

/// A taken unit of a node-wide counter.
#[derive(Debug)]
struct CounterSlot {
    inner: Arc<Inner>,
    which: Counter,
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Proposals,
    Reads,
    Streams,
}

impl Counter {
    fn get(self, inner: &Inner) -> &AtomicUsize {
        match self {
            Counter::Proposals => &inner.proposals,
            Counter::Reads => &inner.reads,
            Counter::Streams => &inner.streams,
        }
    }
}

impl CounterSlot {
    /// Takes one unit of `which` if fewer than `max` are taken.
    fn try_take(inner: &Arc<Inner>, which: Counter, max: usize) -> Option<CounterSlot> {
        let counter = which.get(inner);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(CounterSlot {
            inner: Arc::clone(inner),
            which,
        })
    }
}

impl Drop for CounterSlot {
    fn drop(&mut self) {
        let previous = self.which.get(&self.inner).fetch_sub(1, Ordering::AcqRel);
        debug_assert!(previous > 0, "admission counter underflow");
    }
}

impl Admission {
    /// Admission control with `limits`.
    pub fn new(limits: AdmissionLimits) -> Admission {
        assert!(
            limits.proposals_admin_reserved < limits.proposals_in_flight_max,
            "the admin reserve must leave proposal slots for everyone else"
        );
        Admission {
            inner: Arc::new(Inner {
                limits,
                identities: Mutex::new(HashMap::new()),
                proposals: AtomicUsize::new(0),
                reads: AtomicUsize::new(0),
                streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The first check of every client RPC after the caller's identity: the identity's token
    /// bucket for `op`, and for reads a node-wide read slot held until the answer is built.
    pub fn admit(&self, caller: &Caller, op: Op) -> Result<Admitted, Status> {
        self.take_token(caller, op)?;
        let read = match op {
            Op::Read => Some(
                CounterSlot::try_take(
                    &self.inner,
                    Counter::Reads,
                    self.inner.limits.reads_in_flight_max,
                )
                .ok_or_else(|| {
                    shed(
                        "reads_in_flight",
                        "too many reads in progress on this node",
                        5,
                    )
                })?,
            ),
            Op::Write | Op::Stream => None,
        };
        Ok(Admitted { _read: read })
    }

    /// A proposal slot for a write of `class`; shed at once when the class's share is used.
    pub fn proposal(&self, class: WriteClass) -> Result<ProposalPermit, Status> {
        let limits = &self.inner.limits;
        let everyone = limits.proposals_in_flight_max - limits.proposals_admin_reserved;
        let max = match class {
            WriteClass::Admin => limits.proposals_in_flight_max,
            WriteClass::Maintain => everyone,
            // At least one slot, so a tiny configuration still admits new registrations.
            WriteClass::New => (everyone * limits.proposals_new_percent / 100).max(1),
        };
        let slot =
            CounterSlot::try_take(&self.inner, Counter::Proposals, max).ok_or_else(|| {
                shed(
                    "writes_in_flight",
                    "too many writes in flight on this node",
                    NODE_FULL_RETRY_AFTER_MS,
                )
            })?;
        Ok(ProposalPermit { _slot: slot })
    }

    /// Admits a new long-lived stream of `caller`: a stream-open token, the identity's
    /// maximum of open streams of `kind`, and the node-wide stream maximum. The returned
    /// permit must live as long as the stream.
    pub fn open_stream(&self, caller: &Caller, kind: StreamKind) -> Result<StreamPermit, Status> {
        self.take_token(caller, Op::Stream)?;
        let limits = &self.inner.limits;
        let global = CounterSlot::try_take(&self.inner, Counter::Streams, limits.streams_max)
            .ok_or_else(|| shed("streams", "too many open streams on this node", 1_000))?;
        let identity = caller.uri();
        let mut table = self.inner.lock();
        let Some(state) = table.get_mut(&identity) else {
            // take_token just inserted it and only idle entries are evicted; a concurrent
            // eviction can only hit an entry without streams, so shedding is safe.
            return Err(shed(
                "identities",
                "identity table is full",
                TABLE_FULL_RETRY_AFTER_MS,
            ));
        };
        let (open, max, what) = match kind {
            StreamKind::Watch => (
                &mut state.watchers,
                limits.watchers_per_identity_max,
                "watchers",
            ),
            StreamKind::KeepAlive => (
                &mut state.keepalives,
                limits.keepalives_per_identity_max,
                "keep-alive streams",
            ),
        };
        if *open >= max {
            let mut status = shed(
                "stream_quota",
                &format!("quota_{what}: {identity} already has {max} open {what} on this node"),
                1_000,
            );
            status.metadata_mut().insert(
                crate::error::REASON_METADATA,
                tonic::metadata::MetadataValue::from_static(match kind {
                    StreamKind::Watch => "quota_watchers",
                    StreamKind::KeepAlive => "quota_keepalives",
                }),
            );
            return Err(status);
        }
        *open += 1;
        Ok(StreamPermit {
            _node: global,
            inner: Arc::clone(&self.inner),
            identity,
            kind,
        })
    }

    /// Charges the read bucket of `caller` for an answer of `records` records, after the fact
    /// (the size is known only then). The bucket may go into debt down to minus its burst:
    /// the caller's next reads are shed until the debt is repaid, so a flood of large Lists
    /// is held to the same node cost per second as a flood of small Resolves.
    pub fn charge_answer(&self, caller: &Caller, records: usize) {
        let tokens = (records / LIST_RECORDS_PER_TOKEN) as f64;
        self.charge_reads(&caller.uri(), tokens);
    }

    /// Charges `tokens` to the read bucket of `identity` (into debt down to minus its burst)
    /// and returns how long until the bucket is out of debt again: what a stream must pause
    /// before it may cost more. Work on streams is metered this way, by backpressure, rather
    /// than by ending the stream.
    pub fn charge_reads(&self, identity: &str, tokens: f64) -> Duration {
        if tokens <= 0.0 {
            return Duration::ZERO;
        }
        let limits = &self.inner.limits;
        let now = Instant::now();
        let mut table = self.inner.lock();
        match table.get_mut(identity) {
            Some(state) => {
                state
                    .reads
                    .charge(now, limits.reads_per_sec, limits.reads_burst, tokens);
                state.reads.debt(limits.reads_per_sec)
            }
            // Evicted while its stream is open cannot happen (open streams pin the entry);
            // if it did, the stream pays the longest pause rather than nothing.
            None => Duration::from_millis(RETRY_AFTER_MAX_MS),
        }
    }

    /// Streams open on this node (all identities).
    pub fn streams_open(&self) -> usize {
        self.inner.streams.load(Ordering::Acquire)
    }

    /// Proposals in flight from this node.
    pub fn proposals_in_flight(&self) -> usize {
        self.inner.proposals.load(Ordering::Acquire)
    }

    /// Identities currently tracked.
    pub fn identities_tracked(&self) -> usize {
        self.inner.lock().len()
    }

    fn take_token(&self, caller: &Caller, op: Op) -> Result<(), Status> {
        let limits = &self.inner.limits;
        let now = Instant::now();
        let identity = caller.uri();
        let mut table = self.inner.lock();
        if !table.contains_key(&identity) && table.len() >= limits.identities_max {
            table.retain(|_, state| !state.idle(now, limits.identity_idle));
            // Admins are never locked out by a full table: one extra entry per admin is a
            // bounded overshoot (admins are few and issued by the operator).
            if table.len() >= limits.identities_max && !caller.is_admin() {
                return Err(shed(
                    "identities",
                    "too many client identities active on this node",
                    TABLE_FULL_RETRY_AFTER_MS,
                ));
            }
        }
        let state = table
            .entry(identity)
            .or_insert_with(|| IdentityState::new(limits, now));
        state.seen = now;
        let (bucket, rate, burst, what) = match op {
            Op::Write => (
                &mut state.writes,
                limits.writes_per_sec,
                limits.writes_burst,
                "write",
            ),
            Op::Read => (
                &mut state.reads,
                limits.reads_per_sec,
                limits.reads_burst,
                "read",
            ),
            Op::Stream => (
                &mut state.stream_opens,
                limits.stream_opens_per_sec,
                limits.stream_opens_burst,
                "stream-open",
            ),
        };
        bucket.take(now, rate, burst).map_err(|wait_ms| {
            shed(
                "rate",
                &format!("{} is over its {what} rate on this node", caller.uri()),
                wait_ms,
            )
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        // The node-wide slot goes back with `_node`; this gives back the identity's.
        let mut table = self.inner.lock();
        if let Some(state) = table.get_mut(&self.identity) {
            let open = match self.kind {
                StreamKind::Watch => &mut state.watchers,
                StreamKind::KeepAlive => &mut state.keepalives,
            };
            debug_assert!(*open > 0, "per-identity stream counter underflow");
            *open = open.saturating_sub(1);
            state.seen = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_identity::SpiffeId;

    #[test]
    fn stream_work_charged_past_the_burst_must_pause_until_repaid() {
        let mut bucket = Bucket::full(10.0, Instant::now());
        let now = Instant::now();
        bucket.charge(now, 5.0, 10.0, 5.0);
        assert_eq!(
            bucket.debt(5.0),
            Duration::ZERO,
            "within the burst: no pause"
        );
        bucket.charge(now, 5.0, 10.0, 10.0);
        let pause = bucket.debt(5.0);
        assert!(
            pause >= Duration::from_millis(900) && pause <= Duration::from_millis(1000),
            "5 tokens of debt at 5/s: about a second, got {pause:?}"
        );
        bucket.charge(now, 5.0, 10.0, 1_000.0);
        assert!(
            bucket.debt(5.0) <= Duration::from_secs(2),
            "debt is capped at the burst"
        );
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits::from_config(&LimitsConfig {
            writes_per_identity_per_sec: 10,
            writes_per_identity_burst: 3,
            proposals_in_flight_max: 10,
            proposals_admin_reserved: 2,
            proposals_new_registration_percent: 50,
            watchers_per_identity_max: 2,
            identities_tracked_max: 2,
            identity_idle_ms: 0,
            ..LimitsConfig::default()
        })
    }

    fn caller(uri: &str) -> Caller {
        Caller {
            id: SpiffeId::parse(uri).expect("test SPIFFE id"),
        }
    }

    #[test]
    fn a_burst_is_admitted_then_shed_with_a_retry_hint() {
        let admission = Admission::new(limits());
        let svc = caller("spiffe://t.local/service/a");
        for _ in 0..3 {
            drop(admission.admit(&svc, Op::Write).expect("within the burst"));
        }
        let shed = admission
            .admit(&svc, Op::Write)
            .expect_err("over the burst");
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
        let hint: u64 = shed
            .metadata()
            .get(crate::error::RETRY_AFTER_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("retry hint");
        assert!((1..=100).contains(&hint), "hint {hint} ms at 10/s");
        // Another identity has its own bucket.
        drop(
            admission
                .admit(&caller("spiffe://t.local/service/b"), Op::Write)
                .expect("own bucket"),
        );
    }

    #[test]
    fn a_large_answer_puts_the_reader_in_debt() {
        let admission = Admission::new(limits());
        let reader = caller("spiffe://t.local/reader/r");
        drop(admission.admit(&reader, Op::Read).expect("first read"));
        // reads: default 100/s, burst 200; 64 * 400 records cost 400 tokens: debt of 200.
        admission.charge_answer(&reader, 64 * 400);
        let shed = admission.admit(&reader, Op::Read).expect_err("in debt");
        assert_eq!(shed.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn new_registrations_leave_room_for_renewals_and_admins() {
        let admission = Admission::new(limits());
        // 10 slots, 2 reserved for admins, new registrations get 50% of 8 = 4.
        let new: Vec<_> = (0..4)
            .map(|_| admission.proposal(WriteClass::New).expect("new"))
            .collect();
        assert!(admission.proposal(WriteClass::New).is_err());
        let maintain: Vec<_> = (0..4)
            .map(|_| admission.proposal(WriteClass::Maintain).expect("renewal"))
            .collect();
        assert!(admission.proposal(WriteClass::Maintain).is_err());
        let admin: Vec<_> = (0..2)
            .map(|_| {
                admission
                    .proposal(WriteClass::Admin)
                    .expect("admin reserve")
            })
            .collect();
        assert!(admission.proposal(WriteClass::Admin).is_err());
        assert_eq!(admission.proposals_in_flight(), 10);
        drop((new, maintain, admin));
        assert_eq!(admission.proposals_in_flight(), 0);
    }

    #[test]
    fn watchers_per_identity_are_capped_and_returned_on_drop() {
        let admission = Admission::new(limits());
        let reader = caller("spiffe://t.local/reader/r");
        let a = admission
            .open_stream(&reader, StreamKind::Watch)
            .expect("1");
        let b = admission
            .open_stream(&reader, StreamKind::Watch)
            .expect("2");
        let refused = admission
            .open_stream(&reader, StreamKind::Watch)
            .expect_err("over the cap");
        assert_eq!(
            refused
                .metadata()
                .get(crate::error::REASON_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("quota_watchers")
        );
        assert_eq!(admission.streams_open(), 2);
        drop(a);
        let _c = admission
            .open_stream(&reader, StreamKind::Watch)
            .expect("slot back");
        drop(b);
        assert_eq!(admission.streams_open(), 1);
    }

    #[test]
    fn the_identity_table_is_bounded_but_admins_get_in() {
        let mut l = limits();
        l.identity_idle = Duration::from_secs(3600);
        let admission = Admission::new(l);
        drop(
            admission
                .admit(&caller("spiffe://t.local/service/a"), Op::Read)
                .expect("a"),
        );
        drop(
            admission
                .admit(&caller("spiffe://t.local/service/b"), Op::Read)
                .expect("b"),
        );
        assert!(admission
            .admit(&caller("spiffe://t.local/service/c"), Op::Read)
            .is_err());
        drop(
            admission
                .admit(&caller("spiffe://t.local/admin/ops"), Op::Read)
                .expect("admin"),
        );
        assert_eq!(admission.identities_tracked(), 3);
    }

    #[test]
    fn idle_identities_are_evicted_when_the_table_is_full() {
        let admission = Admission::new(limits()); // identity_idle = 0: everyone is idle
        for name in ["a", "b", "c", "d"] {
            let uri = format!("spiffe://t.local/service/{name}");
            drop(admission.admit(&caller(&uri), Op::Read).expect(name));
        }
        assert!(admission.identities_tracked() <= 2);
    }
}
