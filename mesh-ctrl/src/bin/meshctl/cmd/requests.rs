//! `meshctl requests`: a waypoint's request records, read from its access log (`--log FILE`, or
//! stdin: `kubectl logs <waypoint pod> | meshctl requests`), filtered by method, path, status and
//! Service, shown as a table or as JSON lines. Lines that are not request records (the
//! waypoint's own log) are skipped.

use std::io::Read;
use std::path::PathBuf;

use serde_json::Value;

use super::table;
use crate::Output;

/// Arguments of `meshctl requests`.
#[derive(Debug, clap::Args)]
pub struct RequestsArgs {
    /// The waypoint's access log (default: stdin).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Only this method.
    #[arg(long)]
    method: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    path: Option<String>,
    /// Only this status (`403`) or class (`4xx`).
    #[arg(long, value_parser = parse_status)]
    status: Option<StatusFilter>,
    /// Only requests to this Service (`namespace/name`).
    #[arg(long)]
    service: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// A status or a class of statuses.
#[derive(Debug, Clone, Copy)]
pub enum StatusFilter {
    /// Exactly this status.
    Exact(u16),
    /// Any status of this hundred (4 for 4xx).
    Class(u16),
}

fn parse_status(text: &str) -> Result<StatusFilter, String> {
    let bad = || format!("{text:?} is not a status (403) or a class (4xx)");
    match text.strip_suffix("xx") {
        Some(class) => class.parse().ok().filter(|c| (1..=5).contains(c)).map(StatusFilter::Class).ok_or_else(bad),
        None => text.parse().ok().filter(|s| (100..=599).contains(s)).map(StatusFilter::Exact).ok_or_else(bad),
    }
}

impl RequestsArgs {
    fn keeps(&self, r: &Value) -> bool {
        let text = |key: &str| r[key].as_str().unwrap_or_default();
        let status = r["status"].as_u64().unwrap_or(0);
        self.method.as_deref().is_none_or(|m| text("method").eq_ignore_ascii_case(m))
            && self.path.as_deref().is_none_or(|p| text("path").starts_with(p))
            && self.service.as_deref().is_none_or(|s| text("service") == s)
            && self.status.is_none_or(|f| match f {
                StatusFilter::Exact(s) => status == u64::from(s),
                StatusFilter::Class(c) => status / 100 == u64::from(c),
            })
    }
}

/// Prints the records of the log that pass the filters.
pub fn run(args: RequestsArgs) -> Result<(), String> {
    let mut text = String::new();
    match &args.log {
        Some(path) => {
            text = std::fs::read_to_string(path).map_err(|e| format!("cannot read --log {}: {e}", path.display()))?
        }
        None => {
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("cannot read stdin: {e}"))?;
        }
    }
    let records: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["reporter"] == "waypoint")
        .filter(|r| args.keeps(r))
        .collect();
    if args.output == Output::Json {
        for r in &records {
            println!("{r}");
        }
        return Ok(());
    }
    let text = |r: &Value, key: &str| r[key].as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_string();
    let rows: Vec<[String; 8]> = records
        .iter()
        .map(|r| {
            let outcome = match (r["response_flags"].as_str(), r["policy"].as_str()) {
                (Some("-") | None, Some(policy)) if !policy.is_empty() => policy.to_string(),
                (Some("-") | None, _) => "-".into(),
                (Some(flags), _) => format!("{flags}: {}", text(r, "reason")),
            };
            [
                table::fit(&text(r, "source_identity"), 40),
                text(r, "method"),
                table::fit(&format!("{}{}", text(r, "authority"), text(r, "path")), 40),
                r["status"].to_string(),
                format!("{:.1}ms", r["duration_ms"].as_f64().unwrap_or(0.0)),
                table::fit(&text(r, "route"), 36),
                text(r, "upstream"),
                table::fit(&outcome, 60),
            ]
        })
        .collect();
    table::print(&["SOURCE", "METHOD", "REQUEST", "STATUS", "TIME", "ROUTE", "UPSTREAM", "POLICY/WHY"], &rows);
    Ok(())
}
