//! ferrymesh-cni: a chained CNI plugin (CNI spec 1.x, also 0.4.0) that closes a pod before it
//! runs. On ADD it asks the node's agent (over `--cni-socket`) to hold the pod's network
//! namespace: if the pod's namespace is in the mesh, the agent attaches its capture to the netns
//! (pinned) before the sandbox is handed back, so the pod's connections, and connections to it,
//! are refused until the agent enrolls the pod; never carried in plain text around the mesh.
//! When the agent is not running (after a node reboot, before its pod starts) ADD fails with
//! "try again later", and the runtime retries the sandbox: no mesh pod runs on a node before its
//! agent does. DEL tells the agent the pod is gone; CHECK and VERSION answer as the spec says.
//!
//! It prints the previous plugin's result unchanged: it adds no interface and no address.

#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

/// Where the agent listens unless the network configuration says `agent_socket`.
const DEFAULT_SOCKET: &str = "/var/run/ferrymesh/cni";
/// How long the agent may take to answer (it attaches a program and writes a map).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// A CNI error: the spec's code, message and details.
struct Failure {
    code: u32,
    msg: String,
    details: String,
}

/// CNI error code 11: "try again later" (the agent is not there yet).
const TRY_AGAIN_LATER: u32 = 11;
/// CNI error code 4: invalid network configuration.
const INVALID_CONFIG: u32 = 4;
/// CNI error code 7: invalid environment variables.
const INVALID_ENV: u32 = 7;
/// CNI error code 999 and up: plugin-specific.
const AGENT_REFUSED: u32 = 999;

fn main() {
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let config: Value = serde_json::from_str(&stdin).unwrap_or(Value::Null);
    let version = config["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    let result = match command.as_str() {
        "VERSION" => Ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED})),
        "ADD" => add(&config),
        "DEL" => {
            // DEL must succeed whatever is left: the agent releases what it held, if anything.
            let _ = ask(&config, "del");
            Ok(Value::Null)
        }
        "CHECK" | "GC" | "STATUS" => Ok(Value::Null),
        other => Err(Failure {
            code: INVALID_ENV,
            msg: format!("unknown CNI_COMMAND {other:?}"),
            details: "expected ADD, DEL, CHECK or VERSION".into(),
        }),
    };
    match result {
        Ok(Value::Null) => {}
        Ok(out) => println!("{out}"),
        Err(f) => {
            println!("{}", json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details}));
            std::process::exit(1);
        }
    }
}

/// ADD: the agent holds the pod (or says it is not in the mesh); the previous result passes on.
fn add(config: &Value) -> Result<Value, Failure> {
    if config.is_null() {
        return Err(Failure {
            code: INVALID_CONFIG,
            msg: "no network configuration on stdin".into(),
            details: String::new(),
        });
    }
    // The namespaces the configuration excludes (the cluster's and the mesh's own, as
    // `mesh-agent --install-cni` writes it) start without the agent: mesh-ctrl runs in one.
    let namespace = pod_arg("K8S_POD_NAMESPACE");
    let excluded =
        config["exclude_namespaces"].as_array().into_iter().flatten().any(|n| n.as_str() == Some(&namespace));
    if !excluded {
        ask(config, "add")?;
    }
    let version = config["cniVersion"].clone();
    Ok(match config.get("prevResult") {
        Some(prev) if !prev.is_null() => prev.clone(),
        _ => json!({"cniVersion": version}),
    })
}

/// The value of `key` in CNI_ARGS (`K1=v1;K2=v2`), or empty.
fn pod_arg(key: &str) -> String {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    args.split(';').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or_default().to_string()
}

/// Sends the pod to the agent as `op` and reads its answer.
fn ask(config: &Value, op: &str) -> Result<(), Failure> {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let (namespace, name, uid) = (pod_arg("K8S_POD_NAMESPACE"), pod_arg("K8S_POD_NAME"), pod_arg("K8S_POD_UID"));
    let netns = std::env::var("CNI_NETNS").unwrap_or_default();
    if op == "add" && (namespace.is_empty() || name.is_empty() || netns.is_empty()) {
        return Err(Failure {
            code: INVALID_ENV,
            msg: "CNI_NETNS and CNI_ARGS K8S_POD_NAMESPACE, K8S_POD_NAME are required".into(),
            details: format!("CNI_NETNS={netns:?} CNI_ARGS={args:?}"),
        });
    }
    let socket = config["agent_socket"].as_str().unwrap_or(DEFAULT_SOCKET);
    let not_running = |e: std::io::Error| Failure {
        code: TRY_AGAIN_LATER,
        msg: format!("the ferrymesh agent of this node is not running (cannot reach {socket}: {e})"),
        details: "the pod starts once the agent runs; its mesh traffic is never sent around it".into(),
    };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(not_running)?;
    let request = json!({"op": op, "namespace": namespace, "name": name, "uid": uid, "netns": netns});
    writeln!(stream, "{request}").map_err(not_running)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).map_err(not_running)?;
    let answer: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    match answer["error"].as_str() {
        None if answer.is_object() => Ok(()),
        None => {
            Err(Failure { code: TRY_AGAIN_LATER, msg: format!("the agent answered {line:?}"), details: String::new() })
        }
        Some(error) => Err(Failure {
            code: if answer["retry"] == true { TRY_AGAIN_LATER } else { AGENT_REFUSED },
            msg: format!("the ferrymesh agent cannot hold pod {namespace}/{name}: {error}"),
            details: String::new(),
        }),
    }
}
