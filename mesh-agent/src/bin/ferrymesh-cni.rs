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

use ferrymesh_api::cni::{self, Failure, Invocation, TRY_AGAIN_LATER};

/// How long the agent may take to answer (it attaches a program and writes a map).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let env = |name| std::env::var(name).unwrap_or_default();
    let invocation = Invocation { command: env("CNI_COMMAND"), args: env("CNI_ARGS"), netns: env("CNI_NETNS"), stdin };
    let outcome = cni::run(&invocation, |socket, line| ask(&invocation, socket, line));
    if let Some(printed) = outcome.printed {
        println!("{printed}");
    }
    if outcome.failed {
        std::process::exit(1);
    }
}

/// Sends the request `line` to the agent at `socket` and reads its answer.
fn ask(invocation: &Invocation, socket: &str, line: &str) -> Result<(), Failure> {
    let not_running = |e: std::io::Error| Failure {
        code: TRY_AGAIN_LATER,
        msg: format!("the ferrymesh agent of this node is not running (cannot reach {socket}: {e})"),
        details: "the pod starts once the agent runs; its mesh traffic is never sent around it".into(),
    };
    let mut stream = UnixStream::connect(socket).map_err(not_running)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(not_running)?;
    writeln!(stream, "{line}").map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(not_running)?;
    let pod = |key| cni::pod_arg(&invocation.args, key);
    cni::answered(&answer, pod("K8S_POD_NAMESPACE"), pod("K8S_POD_NAME"))
}
