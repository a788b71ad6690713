//! `meshctl status`: what an agent holds.

use std::path::Path;

use ferrymesh_api::admin::StatusRequest;

use super::flows::print_table;
use crate::agent::{connect, AgentError};
use crate::Output;

/// Prints the status of the agent at `agent`.
pub async fn run(agent: &Path, output: Output) -> Result<(), AgentError> {
    let s = connect(agent).await?.status(StatusRequest {}).await?.into_inner();
    match output {
        Output::Json => {
            let json = serde_json::json!({
                "node": s.node,
                "ctrl_connected": s.ctrl_connected,
                "config_version": s.config_version,
                "enrolled": s.enrolled.iter().map(|e| serde_json::json!({
                    "namespace": e.namespace, "name": e.name, "ip": e.ip,
                    "netns_cookie": e.netns_cookie, "sk_lookup_link_id": e.sk_lookup_link_id,
                })).collect::<Vec<_>>(),
                "programs": s.programs.iter().map(|p| serde_json::json!({
                    "name": p.name, "id": p.id, "attach": p.attach, "link_ids": p.link_ids,
                })).collect::<Vec<_>>(),
                "certs": s.certs.iter().map(|c| serde_json::json!({
                    "identity": c.identity, "serial": c.serial,
                    "not_after_unix_ms": c.not_after_unix_ms, "rotate_at_unix_ms": c.rotate_at_unix_ms,
                })).collect::<Vec<_>>(),
                "counters": s.counters.iter().map(|c| (c.name.clone(), c.value.into())).collect::<serde_json::Map<_, _>>(),
            });
            println!("{json}");
        }
        Output::Table => {
            let ctrl = if s.ctrl_connected { "connected" } else { "NOT CONNECTED (serving the last good config)" };
            println!("node:    {}", s.node);
            println!("mesh-ctrl: {ctrl}, config version {}", s.config_version);
            println!("\nenrolled pods: {}", s.enrolled.len());
            let pods: Vec<[String; 3]> = s
                .enrolled
                .iter()
                .map(|e| [format!("{}/{}", e.namespace, e.name), e.ip.clone(), e.netns_cookie.to_string()])
                .collect();
            print_table(&["POD", "IP", "NETNS COOKIE"], &pods);
            println!("\neBPF programs:");
            let programs: Vec<[String; 4]> = s
                .programs
                .iter()
                .map(|p| [p.name.clone(), p.id.to_string(), format!("{:?}", p.link_ids), p.attach.clone()])
                .collect();
            print_table(&["PROGRAM", "ID", "LINKS", "ATTACHED TO"], &programs);
            println!("\ncertificates:");
            let certs: Vec<[String; 3]> = s
                .certs
                .iter()
                .map(|c| {
                    let not_after =
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(c.not_after_unix_ms.max(0) as u64);
                    [c.identity.clone(), c.serial.clone(), humantime::format_rfc3339_seconds(not_after).to_string()]
                })
                .collect();
            print_table(&["IDENTITY", "SERIAL", "NOT AFTER"], &certs);
            println!("\ncounters:");
            let counters: Vec<[String; 2]> = s.counters.iter().map(|c| [c.name.clone(), c.value.to_string()]).collect();
            print_table(&["COUNTER", "VALUE"], &counters);
        }
    }
    Ok(())
}
