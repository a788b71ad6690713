//! The CNI plugin's invocation: any command, CNI_ARGS, CNI_NETNS and stdin a runtime (or
//! anything that can run the plugin) passes. The plugin answers with one JSON document or
//! nothing, exits 1 exactly when that document is a CNI error, passes an ADD's `prevResult` on
//! unchanged, and what it sends the agent is always a request the agent parses back to the
//! same pod.
#![no_main]

use arbitrary::Arbitrary;
use ferrymesh_api::cni::{self, Failure, Invocation, Request};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    command: u8,
    other_command: String,
    args: String,
    netns: String,
    stdin: String,
    /// The agent's answer line (or None: it is not running).
    answer: Option<String>,
}

const COMMANDS: [&str; 6] = ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"];

fuzz_target!(|input: Input| {
    let command = COMMANDS.get(usize::from(input.command)).map_or(input.other_command.clone(), |c| c.to_string());
    let invocation = Invocation { command, args: input.args, netns: input.netns, stdin: input.stdin };
    let mut sent = None;
    let outcome = cni::run(&invocation, |socket, line| {
        sent = Some((socket.to_string(), line.to_string()));
        let pod = |key| cni::pod_arg(&invocation.args, key);
        match &input.answer {
            Some(answer) => cni::answered(answer, pod("K8S_POD_NAMESPACE"), pod("K8S_POD_NAME")),
            None => Err(Failure { code: cni::TRY_AGAIN_LATER, msg: "not running".into(), details: String::new() }),
        }
    });
    if let Some((_, line)) = &sent {
        assert!(!line.contains('\n'), "one line per request: {line:?}");
        let request: Request = serde_json::from_str(line).expect("the agent parses what the plugin sends");
        assert_eq!(request.namespace, cni::pod_arg(&invocation.args, "K8S_POD_NAMESPACE"));
        assert_eq!(request.name, cni::pod_arg(&invocation.args, "K8S_POD_NAME"));
        assert_eq!(request.netns.as_os_str(), invocation.netns.as_str());
    }
    match &outcome.printed {
        Some(printed) => {
            let is_error = printed.get("code").is_some();
            assert_eq!(outcome.failed, is_error, "{printed}");
            // What is printed is JSON the runtime reads back.
            let text = printed.to_string();
            assert_eq!(&serde_json::from_str::<serde_json::Value>(&text).unwrap(), printed);
            if invocation.command == "ADD" && !outcome.failed {
                let config: serde_json::Value = serde_json::from_str(&invocation.stdin).unwrap();
                match config.get("prevResult") {
                    Some(prev) if !prev.is_null() => assert_eq!(printed, prev, "prevResult passes on unchanged"),
                    _ => assert_eq!(
                        printed.get("cniVersion"),
                        config.get("cniVersion").or(Some(&serde_json::Value::Null))
                    ),
                }
            }
        }
        None => assert!(!outcome.failed),
    }
    if invocation.command == "ADD" && !outcome.failed {
        let config: serde_json::Value = serde_json::from_str(&invocation.stdin).unwrap();
        let namespace = cni::pod_arg(&invocation.args, "K8S_POD_NAMESPACE");
        let excluded = config["exclude_namespaces"].as_array().into_iter().flatten().any(|n| n == namespace);
        assert!(excluded || sent.is_some(), "an ADD of a meshed pod that succeeded asked the agent");
    }
});
