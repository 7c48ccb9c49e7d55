//! Tables for people, JSON for scripts.

use serde_json::{json, Value};
use signpost_client::Resolved;
use signpost_proto::v1::{Member, StatusResponse};

pub(crate) fn print_json(value: &Value) {
    println!("{value}");
}

pub(crate) fn write_result(as_json: bool, human: &str, value: Value) {
    if as_json {
        print_json(&value);
    } else {
        println!("{human}");
    }
}

pub(crate) fn resolved_json(resolved: &Resolved) -> Value {
    let instances: Vec<Value> = resolved
        .instances
        .iter()
        .map(|r| {
            let p = &r.payload;
            let metadata: std::collections::BTreeMap<_, _> = p.metadata.iter().collect();
            json!({
                "instance": p.instance,
                "endpoints": p.endpoints.iter().map(|e| json!({"host": e.host, "port": e.port, "protocol": e.protocol})).collect::<Vec<_>>(),
                "metadata": metadata,
                "tls_identity": p.tls_identity,
                "sequence": p.sequence,
                "issued_at_ms": p.issued_at_ms,
                "ttl_secs": p.ttl_secs,
                "key": hex::encode(r.key),
            })
        })
        .collect();
    json!({"service": resolved.service, "revision": resolved.revision, "instances": instances})
}

pub(crate) fn print_instances(services: &[Resolved]) {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "INSTANCE".to_string(),
        "ENDPOINTS".to_string(),
        "TTL".to_string(),
        "SEQUENCE".to_string(),
    ]];
    for s in services {
        for r in &s.instances {
            let p = &r.payload;
            let endpoints: Vec<String> = p
                .endpoints
                .iter()
                .map(|e| format!("{}:{}/{}", e.host, e.port, e.protocol))
                .collect();
            rows.push([
                p.service.clone(),
                p.instance.clone(),
                endpoints.join(","),
                format!("{}s", p.ttl_secs),
                p.sequence.to_string(),
            ]);
        }
    }
    print_table(&rows);
    let revision = services.iter().map(|s| s.revision).max().unwrap_or(0);
    println!(
        "({} instance(s), revision {revision}, all signatures verified)",
        rows.len() - 1
    );
}

/// One row per member, each with the role that member reports for itself.
/// One member as `signpost status` shows it: its own report and the leader's view of it.
#[derive(Debug)]
pub(crate) struct MemberView {
    pub(crate) member: Member,
    pub(crate) own: Result<StatusResponse, String>,
    pub(crate) error_code: Option<&'static str>,
    /// Entries the leader has that this member does not (leader's view).
    pub(crate) lag: Option<u64>,
    /// Milliseconds since the member last answered the leader (leader's view).
    pub(crate) last_contact_ms: Option<u64>,
    pub(crate) voter: bool,
}

pub(crate) fn print_status(rows: &[MemberView]) {
    let mut table = vec![[
        "ID".to_string(),
        "ADDR".to_string(),
        "ROLE".to_string(),
        "TERM".to_string(),
        "COMMIT".to_string(),
        "APPLIED".to_string(),
        "LAG".to_string(),
        "CONTACT".to_string(),
    ]];
    let or_dash = |v: Option<u64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v}{unit}"));
    for v in rows {
        let m = &v.member;
        let role = |r: &str| {
            if v.voter || r == "learner" {
                r.to_string()
            } else {
                format!("{r} (learner)")
            }
        };
        match &v.own {
            Ok(s) => table.push([
                m.id.to_string(),
                m.addr.clone(),
                role(&s.role),
                s.term.to_string(),
                s.commit_index.to_string(),
                s.applied_index.to_string(),
                or_dash(v.lag, ""),
                or_dash(v.last_contact_ms, " ms"),
            ]),
            Err(_) => table.push([
                m.id.to_string(),
                m.addr.clone(),
                format!("unreachable ({})", v.error_code.unwrap_or("ERROR")),
                "-".into(),
                "-".into(),
                "-".into(),
                or_dash(v.lag, ""),
                or_dash(v.last_contact_ms, " ms"),
            ]),
        }
    }
    print_table(&table);
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
