//! `--workload watch`: how long a change takes to reach every watcher.
//!
//! `--clients` watch streams (reader identities `watch-0..N`, one connection each, spread over
//! the nodes) watch one service while one writer (`bench-w`) re-registers its instance at
//! `--rate` (0: closed loop). The writer notes when it sends write `n`; a watcher that
//! receives the event for write `n` records the time since then. Every watcher should see
//! every write: the report says how many events were expected, delivered and missing. etcd is
//! measured the same way, with the write number in the first 8 bytes of each value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use prost::Message;
use serde_json::json;
use signpost_identity::Identity;
use signpost_proto::etcd;
use signpost_proto::v1::registry_client::RegistryClient;
use signpost_proto::v1::watch_event::Kind;
use signpost_proto::v1::{Envelope, RecordPayload, RegisterRequest, WatchEvent, WatchRequest};
use tonic::transport::Channel;

use super::{bar, histogram, record, BenchArgs, Duplex, Phase, Setup};
use crate::commands::now_ms;

/// How long watchers keep listening after the last write, for events still in flight.
const DRAIN: Duration = Duration::from_secs(3);
/// How often a watcher checks whether it has seen every write.
const POLL: Duration = Duration::from_millis(100);
/// Most writes in one run (the send-time table is allocated before the clock).
const WRITES_MAX: usize = 200_000;
/// The writer's service.
const WRITER: &str = "bench-w";

/// When each write was sent, as nanoseconds after `epoch` plus one (0: not sent).
struct SendTimes {
    epoch: Instant,
    sent: Vec<AtomicU64>,
    // Writes sent in all, once the writer has stopped; u64::MAX while it runs.
    total: AtomicU64,
}

impl SendTimes {
    fn new(writes: usize) -> SendTimes {
        SendTimes {
            epoch: Instant::now(),
            sent: (0..writes).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(u64::MAX),
        }
    }

    fn mark(&self, n: usize) {
        if let Some(slot) = self.sent.get(n) {
            slot.store(
                self.epoch.elapsed().as_nanos() as u64 + 1,
                Ordering::Release,
            );
        }
    }

    /// Microseconds from the send of write `n` to now; `None` for a write never sent.
    fn delay_us(&self, n: u64) -> Option<u64> {
        let sent = self
            .sent
            .get(usize::try_from(n).ok()?)?
            .load(Ordering::Acquire);
        if sent == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        Some(now.saturating_sub(sent) / 1_000)
    }

    fn finished_with(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }
}

/// The write side.
enum Writer {
    Signpost {
        client: RegistryClient<Channel>,
        signed: Vec<Envelope>,
    },
    Etcd {
        kv: etcd::kv_client::KvClient<Channel>,
        key: Vec<u8>,
        value_bytes: usize,
    },
}

impl Writer {
    async fn write(&self, n: usize) -> Option<Result<(), tonic::Status>> {
        match self {
            Writer::Signpost { client, signed } => {
                let envelope = signed.get(n)?.clone();
                Some(
                    client
                        .clone()
                        .register(RegisterRequest {
                            envelope: Some(envelope),
                        })
                        .await
                        .map(|_| ()),
                )
            }
            Writer::Etcd {
                kv,
                key,
                value_bytes,
            } => {
                if n >= WRITES_MAX {
                    return None;
                }
                Some(
                    kv.clone()
                        .put(etcd::PutRequest {
                            key: key.clone(),
                            value: numbered_value(n as u64, *value_bytes),
                            lease: 0,
                        })
                        .await
                        .map(|_| ()),
                )
            }
        }
    }
}

/// A value of `bytes` bytes (at least 8) that carries write number `n`.
fn numbered_value(n: u64, bytes: usize) -> Vec<u8> {
    let mut value = vec![0x5a; bytes.max(8)];
    value[..8].copy_from_slice(&n.to_le_bytes());
    value
}

/// One open watch stream, started before the clock.
enum Watcher {
    Signpost {
        stream: tonic::Streaming<WatchEvent>,
        // Sequence of write 0; write n carries base + n.
        base: u64,
    },
    Etcd {
        // Kept open: closing the request side ends etcd's stream.
        stream: Duplex<etcd::WatchRequest, etcd::WatchResponse>,
    },
}

impl Watcher {
    /// Waits up to `wait` for the next message and returns the write numbers it carries;
    /// `Ok(None)` when nothing arrived in time.
    async fn next(&mut self, wait: Duration) -> Result<Option<Vec<u64>>, tonic::Status> {
        let message = match self {
            Watcher::Signpost { stream, .. } => tokio::time::timeout(wait, stream.message())
                .await
                .map(|r| r.map(|m| m.map(|e| Incoming::Signpost(Box::new(e))))),
            Watcher::Etcd { stream } => tokio::time::timeout(wait, stream.rx.message())
                .await
                .map(|r| r.map(|m| m.map(Incoming::Etcd))),
        };
        let incoming = match message {
            Err(_elapsed) => return Ok(None),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(tonic::Status::unavailable("the watch stream ended")),
            Ok(Ok(Some(incoming))) => incoming,
        };
        let numbers = match (self, incoming) {
            (Watcher::Signpost { base, .. }, Incoming::Signpost(event)) => {
                let sequence = (event.kind == Kind::Put as i32)
                    .then_some(event.record)
                    .flatten()
                    .and_then(|e| RecordPayload::decode(e.payload.as_slice()).ok())
                    .map(|p| p.sequence);
                sequence
                    .and_then(|s| s.checked_sub(*base))
                    .into_iter()
                    .collect()
            }
            (Watcher::Etcd { .. }, Incoming::Etcd(response)) => {
                if response.canceled {
                    return Err(tonic::Status::aborted(format!(
                        "etcd canceled the watch: {}",
                        response.cancel_reason
                    )));
                }
                response
                    .events
                    .iter()
                    .filter_map(|e| e.kv.as_ref())
                    .filter_map(|kv| kv.value.get(..8))
                    .filter_map(|b| b.try_into().ok().map(u64::from_le_bytes))
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(Some(numbers))
    }
}

enum Incoming {
    // Boxed: an event with audit evidence is several times an etcd response.
    Signpost(Box<WatchEvent>),
    Etcd(etcd::WatchResponse),
}

/// What the writer pre-signs: enough for the run at its rate, within the table's bound.
fn writes_for(args: &BenchArgs) -> usize {
    let per_second = if args.rate > 0 {
        args.rate as usize
    } else {
        // Closed loop: more than one writer gets through on one machine.
        5_000
    };
    (args.duration as usize * per_second * 11 / 10 + 10).min(WRITES_MAX)
}

pub(super) async fn run_signpost(
    setup: &Setup,
    args: &BenchArgs,
    duration: Duration,
) -> anyhow::Result<Phase> {
    let writes = writes_for(args);
    let progress = bar(
        args.clients as u64 + 1,
        "preparing the writer and the watchers",
    );
    let td = &setup.config.trust_domain;
    let prefix = setup.issue(&Identity::Service(WRITER.into()), WRITER)?;
    let key = setup.bind_new_key(WRITER).await?;
    let base = now_ms() * 1_000;
    let leader = setup.leader_addr().await?;
    let mut client = setup.raw(&prefix, &leader)?;
    client
        .register(RegisterRequest {
            envelope: Some(record(&key, WRITER, "i0", base, td)),
        })
        .await
        .with_context(|| format!("registering {WRITER}/i0 at {leader}"))?;
    // Write n carries sequence base + 1 + n; the watchers subtract base + 1.
    let signed = (0..writes)
        .map(|n| record(&key, WRITER, "i0", base + 1 + n as u64, td))
        .collect();
    progress.inc(1);
    let endpoints = &setup.config.endpoints;
    let mut watchers = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let name = format!("watch-{i}");
        let prefix = setup.issue(&Identity::Reader(name.clone()), &name)?;
        let addr = &endpoints[i % endpoints.len()];
        let mut stream = setup
            .raw(&prefix, addr)?
            .watch(WatchRequest {
                service: WRITER.into(),
                prefix: false,
                from_revision: 0,
                audit: None,
            })
            .await
            .with_context(|| format!("opening watch stream {name} at {addr}"))?
            .into_inner();
        // The START event: the stream is live before the clock starts.
        match stream.message().await {
            Ok(Some(start)) if start.kind == Kind::Start as i32 => {}
            other => bail!("watch stream {name} at {addr} did not start: {other:?}"),
        }
        watchers.push(Watcher::Signpost {
            stream,
            base: base + 1,
        });
        progress.inc(1);
    }
    progress.finish_and_clear();
    let writer = Writer::Signpost { client, signed };
    Ok(measure(writer, watchers, writes, args.rate, duration).await)
}

pub(super) async fn run_etcd(args: &BenchArgs, duration: Duration) -> anyhow::Result<Phase> {
    let tls = super::etcd_tls(args)?;
    let value_bytes = super::etcd_value().len();
    let mut channels = Vec::with_capacity(args.clients + 1);
    for i in 0..=args.clients {
        let addr = &args.endpoints[i % args.endpoints.len()];
        channels.push(super::etcd_connect(&tls, addr).await?);
    }
    let first = &channels[args.clients];
    let key = b"/signpost-bench/bench-w/i0".to_vec();
    let mut kv = etcd::kv_client::KvClient::new(first.clone());
    kv.put(etcd::PutRequest {
        key: key.clone(),
        value: numbered_value(u64::MAX, value_bytes),
        lease: 0,
    })
    .await
    .context("putting the watched key")?;
    let progress = bar(args.clients as u64, "preparing the etcd watchers");
    let mut watchers = Vec::with_capacity(args.clients);
    for (i, channel) in channels.iter().take(args.clients).enumerate() {
        let channel = channel.clone();
        let (tx, outbound) = super::duplex_channel();
        tx.send(etcd::WatchRequest {
            request_union: Some(etcd::watch_request::RequestUnion::CreateRequest(
                etcd::WatchCreateRequest {
                    key: key.clone(),
                    range_end: Vec::new(),
                    start_revision: 0,
                },
            )),
        })
        .await
        .context("queueing a watch request")?;
        let rx = etcd::watch_client::WatchClient::new(channel)
            .watch(outbound)
            .await
            .context("opening an etcd watch stream")?
            .into_inner();
        let mut stream = Duplex { tx, rx };
        match stream.rx.message().await {
            Ok(Some(created)) if created.created => {}
            other => bail!("etcd watch {i} was not created: {other:?}"),
        }
        watchers.push(Watcher::Etcd { stream });
        progress.inc(1);
    }
    progress.finish_and_clear();
    let writer = Writer::Etcd {
        kv,
        key,
        value_bytes,
    };
    Ok(measure(writer, watchers, writes_for(args), args.rate, duration).await)
}

/// Runs the writer for `duration` while every watcher records delays, then lets the watchers
/// drain (up to [`DRAIN`]) and adds up what they saw.
async fn measure(
    writer: Writer,
    watchers: Vec<Watcher>,
    writes: usize,
    rate: u32,
    duration: Duration,
) -> Phase {
    let times = Arc::new(SendTimes::new(writes));
    let started = Instant::now();
    let deadline = started + duration;
    let watcher_count = watchers.len() as u64;
    let progress = bar(duration.as_secs(), "watch: running");
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|mut watcher| {
            let times = Arc::clone(&times);
            tokio::spawn(async move {
                let mut delays = histogram();
                let mut seen = 0u64;
                let mut error = None;
                loop {
                    if seen >= times.finished_with() || Instant::now() > deadline + DRAIN {
                        break;
                    }
                    match watcher.next(POLL).await {
                        Ok(Some(numbers)) => {
                            for n in numbers {
                                if let Some(delay) = times.delay_us(n) {
                                    delays.saturating_record(delay);
                                    seen += 1;
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(status) => {
                            error = Some(status);
                            break;
                        }
                    }
                }
                (delays, seen, error)
            })
        })
        .collect();

    let mut pace = super::pace(rate);
    let mut phase = Phase::empty();
    let mut write_latencies = histogram();
    let mut writes_ok = 0u64;
    let mut n = 0usize;
    while Instant::now() < deadline {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
            if Instant::now() >= deadline {
                break;
            }
        }
        times.mark(n);
        let t0 = Instant::now();
        let Some(result) = writer.write(n).await else {
            break;
        };
        n += 1;
        match result {
            Ok(()) => {
                writes_ok += 1;
                write_latencies.saturating_record(t0.elapsed().as_micros() as u64);
            }
            Err(status) => phase.count_error("register", status),
        }
        progress.set_position(started.elapsed().as_secs().min(duration.as_secs()));
    }
    phase.elapsed = started.elapsed();
    times.total.store(n as u64, Ordering::Release);
    progress.finish_and_clear();

    let mut delivered = 0u64;
    let mut watchers_failed = 0u64;
    for task in tasks {
        match task.await {
            Ok((delays, seen, error)) => {
                let _ = phase.latencies_us.add(&delays);
                delivered += seen;
                if let Some(status) = error {
                    watchers_failed += 1;
                    phase.count_error("watch", status);
                }
            }
            Err(_) => watchers_failed += 1,
        }
    }
    phase.ok = delivered;
    phase.by_op.insert("event", phase.latencies_us.clone());
    phase.by_op.insert("register", write_latencies);
    // A failed write may still have been applied, so its events count if they arrive.
    let expected = writes_ok * watcher_count;
    phase.extra.insert("watchers".into(), json!(watcher_count));
    phase.extra.insert("writes_sent".into(), json!(n));
    phase.extra.insert("writes_ok".into(), json!(writes_ok));
    phase
        .extra
        .insert("events_expected".into(), json!(expected));
    phase
        .extra
        .insert("events_delivered".into(), json!(delivered));
    phase.extra.insert(
        "events_missing".into(),
        json!(expected.saturating_sub(delivered)),
    );
    phase
        .extra
        .insert("watchers_failed".into(), json!(watchers_failed));
    phase
}
