//! Tables for people, JSON for scripts.

use serde_json::{json, Value};
use signpost_client::{ClientError, Resolved};
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
pub(crate) fn print_status(rows: &[(Member, Result<StatusResponse, ClientError>)]) {
    let mut table = vec![[
        "ID".to_string(),
        "ADDR".to_string(),
        "ROLE".to_string(),
        "TERM".to_string(),
        "COMMIT".to_string(),
        "APPLIED".to_string(),
    ]];
    for (m, s) in rows {
        match s {
            Ok(s) => table.push([
                m.id.to_string(),
                m.addr.clone(),
                s.role.clone(),
                s.term.to_string(),
                s.commit_index.to_string(),
                s.applied_index.to_string(),
            ]),
            Err(e) => table.push([
                m.id.to_string(),
                m.addr.clone(),
                format!(
                    "unreachable ({})",
                    e.code().map(signpost_client::code_name).unwrap_or("ERROR")
                ),
                "-".into(),
                "-".into(),
                "-".into(),
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
