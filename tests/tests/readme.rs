//! The README's by-hand walkthrough ("Running it by hand"), run as written: every line of its
//! `sh` block but `cargo xtask build` (this test's own build did that), as one bash script with
//! `set -e` (a failing line fails the test) from a directory laid out like the checkout
//! (`target/`, `examples/`), with the links to the binaries that build made in target/release/.
//!
//! The lines change the machine (a bridge, network namespaces, /run, the bpf filesystem), so
//! the script runs in mount, network and PID namespaces of its own: a private /run and bpf
//! filesystem, its own loopback and bridge. Whatever the script does or leaves, it all goes when
//! its PID namespace ends; nothing it makes is reachable from, or reaches, the real network.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferrymesh_testbed::mesh::bin_dir;
use ferrymesh_testbed::topology::ScratchDir;

fn checkout() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The lines of the README's `sh` block after "Running it by hand".
fn walkthrough() -> String {
    let readme = std::fs::read_to_string(checkout().join("README.md")).expect("README.md");
    let at = readme.find("Running it by hand").expect("the README has its by-hand section");
    let block = &readme[at..];
    let start = block.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let end = start + block[start..].find("```").expect("the block ends");
    block[start..end].to_string()
}

/// Makes the machine private to the script before its first line: /run (sockets, netns mounts),
/// the bpf filesystem (pins), the CNI directories if the machine has them (`--uninstall` looks
/// there), and the loopback of its network namespace. `set -x` shows each line as it runs.
const PRIVATE_MACHINE: &str = "set -eu
exec 2>&1
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
for dir in /etc/cni /opt/cni; do if [ -d $dir ]; then mount -t tmpfs tmpfs $dir; fi; done
ip link set lo up
set -x
";

#[test]
fn the_readmes_by_hand_steps_run_as_written() {
    let block = walkthrough();
    assert!(block.lines().next() == Some("cargo xtask build"), "the walkthrough starts with the build:\n{block}");
    let steps: Vec<&str> = block.lines().skip(1).collect();
    let scratch = ScratchDir::new("readme");
    // The build's binaries are in target/<triple>/release/; `cargo xtask build` links them
    // into target/release/, where the README's lines find them.
    let target = bin_dir().parent().and_then(Path::parent).expect("target/").to_path_buf();
    assert!(
        target.join("release/mesh-ctrl").is_file(),
        "no {}: `cargo xtask build` links the binaries there",
        target.join("release/mesh-ctrl").display()
    );
    std::os::unix::fs::symlink(&target, scratch.path().join("target")).unwrap();
    std::os::unix::fs::symlink(checkout().join("examples"), scratch.path().join("examples")).unwrap();
    let script = scratch.path().join("walkthrough.sh");
    std::fs::write(&script, format!("{PRIVATE_MACHINE}{}\n", steps.join("\n"))).unwrap();

    // Bounded: whatever hangs is killed with the PID namespace after 4 minutes.
    let out = Command::new("timeout")
        .args(["--kill-after=5", "240"])
        .args(["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg("bash")
        .arg(&script)
        .current_dir(scratch.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the walkthrough failed ({}):\n{log}", out.status);

    // What each step shows its reader.
    let expect = [
        // a -> c:8080 was captured and carried: c's HTTP server saw a's own address.
        ("a's request reached c as a", "client 10.244.1.2:"),
        ("the sink is refused", "refused by shop/deny-sink"),
        ("explain names the policy", "verdict: DENIED (denied: shop/deny-sink rule 0)"),
        ("the agent's metrics", "ferrymesh_tcp_connections_failed_total{"),
        ("mesh-ctrl's metrics", "ferrymesh_ctrl_connected_agents 1"),
        ("the check", "0 rejected"),
        ("the waypoint served", "mesh-waypoint serving waypoint=shop/shop-waypoint"),
        ("the pins were removed", "pinned eBPF objects under /sys/fs/bpf/ferrymesh"),
    ];
    for (what, text) in expect {
        assert!(log.contains(text), "{what}: no {text:?} in the walkthrough's output:\n{log}");
    }
    // The refusal is prompt (a reset or a refused connect, not curl's 3 s timeout), and the
    // flows, followed live and then filtered, show the allowed flow and the denied one with the
    // policy that decided it.
    // curl names the port when the connect is refused, not when the connection is reset after
    // it: the error is the first curl error after the request to 9000 (the trace's `+ ...` line).
    // The followed flows are taken out first: each is one write, and one can land inside curl's
    // message (`cur<flow>l: (7) Failed to connect`).
    let unfollowed = without_flow_lines(&log);
    let refused = unfollowed
        .lines()
        .skip_while(|l| !(l.starts_with('+') && l.contains(":9000/")))
        .find(|l| l.starts_with("curl: ("));
    assert!(refused.is_some_and(|l| !l.contains("timed out")), "{refused:?}\n{log}");
    let flow = |port: &str, verdict: &str| {
        log.lines().any(|l| l.contains("shop/a:") && l.contains(&format!("shop/c:{port}")) && l.contains(verdict))
    };
    assert!(flow("8080", "allowed") && flow("9000", "denied   shop/deny-sink rule 0"), "{log}");
    // Both agents' rows of the refusal name the node-local handover it was refused on.
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("shop/c:9000") && l.contains("denied")).collect();
    assert!(refusals.len() >= 2 && refusals.iter().all(|l| l.contains(" local ")), "{refusals:#?}");
    // A reader's pipes (`meshctl status | grep -q`) end meshctl quietly.
    assert!(!log.contains("panicked"), "{log}");
    // Nothing of it is left on the machine.
    assert!(!Path::new("/run/netns/shop-a").exists(), "the pods' namespaces were private");
    assert!(!Command::new("ip").args(["link", "show", "fm-pods"]).output().unwrap().status.success());
}

/// `log` without the lines `meshctl flows` prints (`12:06:01.266  shop/a:52512 ...`), wherever
/// they start: a line printed in the background may cut into another process's output.
fn without_flow_lines(log: &str) -> String {
    let mut kept = String::new();
    let mut rest = log;
    while let Some(at) = (0..rest.len()).find(|&i| starts_with_flow_time(&rest.as_bytes()[i..])) {
        kept.push_str(&rest[..at]);
        rest = rest[at..].split_once('\n').map_or("", |(_, after)| after);
    }
    kept.push_str(rest);
    kept
}

/// Whether `text` starts with a flow line's time column: `HH:MM:SS.mmm` and two spaces.
fn starts_with_flow_time(text: &[u8]) -> bool {
    const SHAPE: &[u8] = b"00:00:00.000  ";
    text.len() >= SHAPE.len()
        && SHAPE
            .iter()
            .zip(text)
            .all(|(shape, byte)| if *shape == b'0' { byte.is_ascii_digit() } else { shape == byte })
}

#[test]
fn flow_lines_are_taken_out_wherever_they_cut_in() {
    let log = "+ curl http://10.244.1.3:9000/\n\
               cur12:06:01.266  shop/a:0  shop/c:9000  0/0  local  denied   shop/deny-sink rule 0\n\
               l12:06:01.266  shop/a:52512  shop/c:9000  0/0  plain  denied   shop/deny-sink rule 0\n\
               : (7) Failed to connect\n\
               {\"time\":\"2026-12-03T12:06:01.253Z\"}\n";
    assert_eq!(
        without_flow_lines(log),
        "+ curl http://10.244.1.3:9000/\ncurl: (7) Failed to connect\n{\"time\":\"2026-12-03T12:06:01.253Z\"}\n"
    );
}
