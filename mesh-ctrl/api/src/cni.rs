//! The CNI protocol between the `ferrymesh-cni` plugin and its node's agent (one JSON line each
//! way: [`Request`], [`Answer`]), and what the plugin makes of one invocation: the runtime's
//! command, environment and network configuration (stdin) in; the request it sends the agent,
//! what it prints and how it exits out ([`run`]). The plugin program only reads its inputs,
//! talks to the agent's socket and prints; everything a runtime can put on stdin is handled
//! here, where the fuzz target drives it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What the plugin asks.
#[derive(Debug, Clone, Deserialize)]
pub struct Request {
    /// `add` (the sandbox is being set up) or `del` (it is being torn down).
    pub op: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID (K8S_POD_UID), when the runtime passes it.
    #[serde(default)]
    pub uid: String,
    /// Path of the pod's network namespace.
    #[serde(default)]
    pub netns: PathBuf,
}

impl Request {
    /// The key the pod is held under: its UID, else `namespace/name` (local mode's UID when a
    /// pod has none).
    pub fn key(&self) -> String {
        match self.uid.is_empty() {
            true => format!("{}/{}", self.namespace, self.name),
            false => self.uid.clone(),
        }
    }
}

/// The answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Answer {
    /// Done: whether the pod is held (it is in the mesh) or left alone.
    Done {
        /// The pod is closed until enrolled.
        held: bool,
    },
    /// Not done; `retry`: the runtime should try again later (no config yet).
    Failed {
        /// Why.
        error: String,
        /// Whether trying again later may succeed.
        retry: bool,
    },
}

/// Where the agent listens unless the network configuration says `agent_socket`.
pub const DEFAULT_SOCKET: &str = "/var/run/ferrymesh/cni";
/// The CNI versions the plugin speaks.
pub const SUPPORTED: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// CNI error code 11: "try again later" (the agent is not there yet).
pub const TRY_AGAIN_LATER: u32 = 11;
/// CNI error code 4: invalid network configuration.
pub const INVALID_CONFIG: u32 = 4;
/// CNI error code 7: invalid environment variables.
pub const INVALID_ENV: u32 = 7;
/// CNI error code 999 and up: plugin-specific.
pub const AGENT_REFUSED: u32 = 999;

/// One invocation, as the runtime makes it.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// CNI_COMMAND.
    pub command: String,
    /// CNI_ARGS (`K1=v1;K2=v2`).
    pub args: String,
    /// CNI_NETNS.
    pub netns: String,
    /// The network configuration, as read from stdin.
    pub stdin: String,
}

/// A CNI error: the spec's code, message and details.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The spec's error code.
    pub code: u32,
    /// What went wrong.
    pub msg: String,
    /// More on it.
    pub details: String,
}

/// What the plugin prints (nothing, or one JSON document) and whether it exits with 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The JSON to print on stdout, if any.
    pub printed: Option<Value>,
    /// Exit status 1 (a CNI error was printed) rather than 0.
    pub failed: bool,
}

/// Runs `invocation`, asking the agent through `ask(socket, request line)` (the agent's
/// [`Request`] as JSON; its answer, or why it could not be had).
pub fn run(invocation: &Invocation, ask: impl FnOnce(&str, &str) -> Result<(), Failure>) -> Outcome {
    let config: Value = serde_json::from_str(&invocation.stdin).unwrap_or(Value::Null);
    let version = config["cniVersion"].as_str().unwrap_or("1.0.0").to_string();
    let result = match invocation.command.as_str() {
        "VERSION" => Ok(json!({"cniVersion": version, "supportedVersions": SUPPORTED})),
        "ADD" => add(invocation, &config, ask),
        "DEL" => {
            // DEL must succeed whatever is left: the agent releases what it held, if anything.
            let _ = request(invocation, &config, "del").map(|(socket, line)| ask(&socket, &line));
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
        Ok(Value::Null) => Outcome { printed: None, failed: false },
        Ok(out) => Outcome { printed: Some(out), failed: false },
        Err(f) => Outcome {
            printed: Some(json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details})),
            failed: true,
        },
    }
}

/// ADD: the agent holds the pod (or says it is not in the mesh); the previous result passes on.
fn add(
    invocation: &Invocation,
    config: &Value,
    ask: impl FnOnce(&str, &str) -> Result<(), Failure>,
) -> Result<Value, Failure> {
    if !config.is_object() {
        return Err(Failure {
            code: INVALID_CONFIG,
            msg: "no network configuration (a JSON object) on stdin".into(),
            details: String::new(),
        });
    }
    // The namespaces the configuration excludes (the cluster's and the mesh's own, as
    // `mesh-agent --install-cni` writes it) start without the agent: mesh-ctrl runs in one.
    let namespace = pod_arg(&invocation.args, "K8S_POD_NAMESPACE");
    let excluded = config["exclude_namespaces"].as_array().into_iter().flatten().any(|n| n.as_str() == Some(namespace));
    if !excluded {
        let (socket, line) = request(invocation, config, "add")?;
        ask(&socket, &line)?;
    }
    let version = config["cniVersion"].clone();
    Ok(match config.get("prevResult") {
        Some(prev) if !prev.is_null() => prev.clone(),
        _ => json!({"cniVersion": version}),
    })
}

/// The value of `key` in CNI_ARGS (`K1=v1;K2=v2`), or empty.
pub fn pod_arg<'a>(args: &'a str, key: &str) -> &'a str {
    args.split(';').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or_default()
}

/// The agent's socket and the request line for `op` on the pod of `invocation`.
fn request(invocation: &Invocation, config: &Value, op: &str) -> Result<(String, String), Failure> {
    let args = &invocation.args;
    let (namespace, name, uid) =
        (pod_arg(args, "K8S_POD_NAMESPACE"), pod_arg(args, "K8S_POD_NAME"), pod_arg(args, "K8S_POD_UID"));
    let netns = &invocation.netns;
    if op == "add" && (namespace.is_empty() || name.is_empty() || netns.is_empty()) {
        return Err(Failure {
            code: INVALID_ENV,
            msg: "CNI_NETNS and CNI_ARGS K8S_POD_NAMESPACE, K8S_POD_NAME are required".into(),
            details: format!("CNI_NETNS={netns:?} CNI_ARGS={args:?}"),
        });
    }
    let socket = config["agent_socket"].as_str().unwrap_or(DEFAULT_SOCKET).to_string();
    let line = json!({"op": op, "namespace": namespace, "name": name, "uid": uid, "netns": netns}).to_string();
    Ok((socket, line))
}

/// The plugin's reading of the agent's answer line to a request for pod `namespace/name`.
pub fn answered(line: &str, namespace: &str, name: &str) -> Result<(), Failure> {
    let answer: Value = serde_json::from_str(line).unwrap_or(Value::Null);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(command: &str, stdin: &str) -> Invocation {
        Invocation {
            command: command.into(),
            args: "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1".into(),
            netns: "/var/run/netns/web-1".into(),
            stdin: stdin.into(),
        }
    }

    #[test]
    fn add_asks_the_agent_for_the_pod_and_passes_the_previous_result_on() {
        let stdin =
            r#"{"cniVersion":"1.0.0","agent_socket":"/run/s","prevResult":{"ips":[{"address":"10.0.0.5/24"}]}}"#;
        let mut asked = None;
        let out = run(&invocation("ADD", stdin), |socket, line| {
            asked = Some((socket.to_string(), line.to_string()));
            Ok(())
        });
        assert_eq!(out, Outcome { printed: Some(json!({"ips":[{"address":"10.0.0.5/24"}]})), failed: false });
        let (socket, line) = asked.expect("the agent was asked");
        assert_eq!(socket, "/run/s");
        let request: Request = serde_json::from_str(&line).unwrap();
        assert_eq!((request.op.as_str(), request.key()), ("add", "u1".to_string()));
    }

    #[test]
    fn bad_input_is_a_cni_error_and_asks_nothing() {
        let table = [
            (invocation("ADD", ""), INVALID_CONFIG),
            (invocation("ADD", "[1]"), INVALID_CONFIG),
            (Invocation { args: String::new(), ..invocation("ADD", "{}") }, INVALID_ENV),
            (invocation("BOGUS", "{}"), INVALID_ENV),
        ];
        for (invocation, code) in table {
            let out = run(&invocation, |_, _| panic!("asked the agent on {invocation:?}"));
            assert!(out.failed, "{invocation:?}");
            assert_eq!(out.printed.unwrap()["code"], code, "{invocation:?}");
        }
    }

    #[test]
    fn the_agents_refusal_is_passed_on_with_its_code() {
        let out = run(&invocation("ADD", "{}"), |_, _| {
            answered(r#"{"error":"no config yet","retry":true}"#, "shop", "web-1")
        });
        assert!(out.failed);
        assert_eq!(out.printed.unwrap()["code"], TRY_AGAIN_LATER);
    }
}
