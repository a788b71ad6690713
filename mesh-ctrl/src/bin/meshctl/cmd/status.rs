//! `meshctl status` and `meshctl certs`: what each agent holds.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrymesh_api::admin::{StatusRequest, StatusResponse};
use serde_json::json;

use super::table;
use crate::agent::{connect, AgentError};
use crate::Output;

async fn status(agent: &Path) -> Result<StatusResponse, AgentError> {
    connect(agent).await?.status(StatusRequest {}).await.map(|r| r.into_inner()).map_err(|s| AgentError::rpc(agent, s))
}

fn time(unix_ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(unix_ms.max(0) as u64)
}

/// `2h 3m` from now, or `overdue`.
fn until(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => humantime::format_duration(Duration::from_secs(d.as_secs())).to_string(),
        Err(_) => "overdue".into(),
    }
}

/// The first 16 hex digits of a SHA-256, enough to tell roots apart.
fn short(sha256: &str) -> String {
    sha256.chars().take(16).collect()
}

fn rfc3339(unix_ms: i64) -> String {
    humantime::format_rfc3339_seconds(time(unix_ms)).to_string()
}

fn status_json(s: &StatusResponse) -> serde_json::Value {
    json!({
        "node": s.node,
        "ctrl_connected": s.ctrl_connected,
        "config_version": s.config_version,
        "enrolled": s.enrolled.iter().map(|e| json!({
            "namespace": e.namespace, "name": e.name, "ip": e.ip, "other_ips": e.other_ips,
            "netns_cookie": e.netns_cookie, "sk_lookup_link_id": e.sk_lookup_link_id,
            "adopted": e.adopted,
        })).collect::<Vec<_>>(),
        "bpf_dir": s.bpf_dir,
        "adopted_maps": s.adopted_maps,
        "adopted_links": s.adopted_links,
        "programs": s.programs.iter().map(|p| json!({
            "name": p.name, "id": p.id, "attach": p.attach, "link_ids": p.link_ids,
        })).collect::<Vec<_>>(),
        "certs": s.certs.iter().map(|c| json!({
            "identity": c.identity, "serial": c.serial,
            "not_after_unix_ms": c.not_after_unix_ms, "rotate_at_unix_ms": c.rotate_at_unix_ms,
            "issuer_sha256": c.issuer_sha256,
        })).collect::<Vec<_>>(),
        "trust_roots": s.trust_roots.iter().map(|r| json!({
            "subject": r.subject, "sha256": r.sha256, "not_after_unix_ms": r.not_after_unix_ms,
        })).collect::<Vec<_>>(),
        "issuer_sha256": s.issuer_sha256,
        "counters": s.counters.iter().map(|c| (c.name.clone(), c.value.into())).collect::<serde_json::Map<_, _>>(),
        "maps": s.maps.iter().map(|m| json!({"name": m.name, "entries": m.entries, "max_entries": m.max_entries})).collect::<Vec<_>>(),
    })
}

/// Prints the status of each agent.
pub async fn run(agents: &[PathBuf], output: Output) -> Result<(), String> {
    for (i, agent) in agents.iter().enumerate() {
        let s = status(agent).await?;
        if output == Output::Json {
            println!("{}", status_json(&s));
            continue;
        }
        if i > 0 {
            println!();
        }
        let ctrl = if s.ctrl_connected {
            format!("connected, config version {}", s.config_version)
        } else {
            format!(
                "NOT CONNECTED: mesh-ctrl is unreachable; serving the last good config (version {})",
                s.config_version
            )
        };
        println!("node:      {}", s.node);
        println!("mesh-ctrl: {ctrl}");
        println!("\nenrolled pods: {}", s.enrolled.len());
        let pods: Vec<[String; 3]> = s
            .enrolled
            .iter()
            .map(|e| {
                let ips = std::iter::once(&e.ip).chain(&e.other_ips).cloned().collect::<Vec<_>>().join(",");
                [format!("{}/{}", e.namespace, e.name), ips, e.netns_cookie.to_string()]
            })
            .collect();
        table::print(&["POD", "IP", "NETNS COOKIE"], &pods);
        let adopted_pods = s.enrolled.iter().filter(|e| e.adopted).count();
        if s.adopted_maps.is_empty() && s.adopted_links == 0 {
            println!("\neBPF state: created under {}", s.bpf_dir);
        } else {
            println!(
                "\neBPF state: adopted from an earlier agent under {} ({} maps, {} node-wide links, {} pod links)",
                s.bpf_dir,
                s.adopted_maps.len(),
                s.adopted_links,
                adopted_pods
            );
        }
        println!("\neBPF programs attached:");
        let programs: Vec<[String; 4]> = s
            .programs
            .iter()
            .map(|p| [p.name.clone(), p.id.to_string(), format!("{:?}", p.link_ids), p.attach.clone()])
            .collect();
        table::print(&["PROGRAM", "ID", "LINKS", "ATTACHED TO"], &programs);
        println!("\neBPF counters:");
        let counters: Vec<[String; 2]> = s.counters.iter().map(|c| [c.name.clone(), c.value.to_string()]).collect();
        table::print(&["COUNTER", "VALUE"], &counters);
        println!("\neBPF maps:");
        let maps: Vec<[String; 3]> = s
            .maps
            .iter()
            .map(|m| {
                let percent = if m.max_entries == 0 { 0.0 } else { 100.0 * m.entries as f64 / m.max_entries as f64 };
                [m.name.clone(), format!("{}/{}", m.entries, m.max_entries), format!("{percent:.1}%")]
            })
            .collect();
        table::print(&["MAP", "ENTRIES", "FILL"], &maps);
        let n = s.trust_roots.len();
        println!("\ntrust bundle: {n} root{}", if n == 1 { "" } else { "s" });
        let roots: Vec<[String; 4]> = s
            .trust_roots
            .iter()
            .map(|r| {
                let signing = if s.certs.iter().any(|c| c.issuer_sha256 == r.sha256) { "yes" } else { "" };
                [short(&r.sha256), r.subject.clone(), rfc3339(r.not_after_unix_ms), signing.to_string()]
            })
            .collect();
        table::print(&["SHA-256", "SUBJECT", "NOT AFTER", "SIGNED A HELD CERT"], &roots);
        let stale = s.certs.iter().filter(|c| c.issuer_sha256 != s.issuer_sha256).count();
        println!(
            "\ncertificates: {} ({stale} signed by a CA certificate other than mesh-ctrl's current {})",
            s.certs.len(),
            short(&s.issuer_sha256)
        );
    }
    Ok(())
}

/// Prints the certificates each agent holds.
pub async fn certs(agents: &[PathBuf], output: Output) -> Result<(), String> {
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for agent in agents {
        let s = status(agent).await?;
        for c in &s.certs {
            let (not_after, rotate_at) = (time(c.not_after_unix_ms), time(c.rotate_at_unix_ms));
            all.push(json!({
                "node": s.node, "identity": c.identity, "serial": c.serial,
                "not_after": humantime::format_rfc3339_seconds(not_after).to_string(),
                "rotate_at": humantime::format_rfc3339_seconds(rotate_at).to_string(),
                "issuer_sha256": c.issuer_sha256,
            }));
            rows.push([
                s.node.clone(),
                c.identity.clone(),
                c.serial.clone(),
                humantime::format_rfc3339_seconds(not_after).to_string(),
                until(rotate_at),
                short(&c.issuer_sha256),
            ]);
        }
    }
    match output {
        Output::Json => println!("{}", json!(all)),
        _ => table::print(&["NODE", "IDENTITY", "SERIAL", "NOT AFTER", "ROTATES IN", "ISSUER"], &rows),
    }
    Ok(())
}
