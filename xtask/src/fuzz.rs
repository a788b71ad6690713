//! `cargo xtask fuzz [--time S]`: the cargo fuzz targets of `fuzz/` (their own workspace), each
//! run for S seconds with libFuzzer and AddressSanitizer on the nightly toolchain.
//!
//! Each target starts from its committed corpus (`fuzz/corpus/<target>`, read only) and keeps
//! what it finds in `target/fuzz/corpus/<target>`; docs/SECURITY.md ("Fuzzing") says how finds
//! that add coverage are merged into the committed corpus. A crash fails the run; its input is in
//! `fuzz/artifacts/<target>/`, and becomes a regression test in the crate it crashed (and an
//! input of the committed corpus) before it is fixed.

use std::process::Command;

use anyhow::{ensure, Result};

use crate::{cmd, output, root, step, target_dir, Nightly};

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 5] = ["hbone_server", "waypoint_http", "jwt", "config_update", "cni_stdin"];
/// Seconds per target in `cargo xtask test`.
pub const SECONDS_IN_TEST: u64 = 20;
/// Seconds per target when none are given.
const DEFAULT_SECONDS: u64 = 60;
/// The cargo-fuzz release line.
const CARGO_FUZZ_VERSION: &str = "^0.13";

/// The seconds `args` ask for (`--time S`), or None when they are not understood.
pub fn seconds(args: &[String]) -> Option<u64> {
    match args {
        [] => Some(DEFAULT_SECONDS),
        [flag, seconds] if flag == "--time" => seconds.parse().ok().filter(|s| *s > 0),
        _ => None,
    }
}

/// Installs cargo-fuzz (once), builds every target, and runs each for `seconds`.
pub fn run(nightly: &Nightly, seconds: u64) -> Result<()> {
    setup_cargo_fuzz()?;
    step("fuzz: build the targets (AddressSanitizer)");
    crate::run(&mut cargo_fuzz(nightly, "build"))?;
    for target in TARGETS {
        step(&format!("fuzz: {target} for {seconds} s"));
        let found = target_dir().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let mut c = cargo_fuzz(nightly, "run");
        c.arg(target).arg(&found).arg(root().join("fuzz/corpus").join(target)).arg("--").args([
            format!("-max_total_time={seconds}"),
            // One input running 30 s is a hang, reported as a crash (generous: these machines
            // have 2 cores, often busy).
            "-timeout=30".to_string(),
            "-rss_limit_mb=4096".to_string(),
            "-print_final_stats=1".to_string(),
        ]);
        let status = c.status()?;
        ensure!(
            status.success(),
            "fuzz target {target} failed ({status}): its input is in fuzz/artifacts/{target}/; \
             reproduce with `cargo +{} fuzz run {target} <input>` in fuzz/",
            nightly.name
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz <subcommand>` in fuzz/, building into target/fuzz with the flags every
/// call shares (the same flags, so `run` reuses what `build` built).
fn cargo_fuzz(nightly: &Nightly, subcommand: &str) -> Command {
    let mut c = cmd("cargo");
    c.current_dir(root().join("fuzz"))
        .arg(format!("+{}", nightly.name))
        .args(["fuzz", subcommand])
        .arg("--target-dir")
        .arg(target_dir().join("fuzz"))
        // Debug assertions and overflow checks on (cargo fuzz's default), 16 codegen units: the
        // build takes half the time of one unit's, the targets run nearly as fast.
        .args(["--debug-assertions", "--codegen-units", "16"]);
    if nightly.bootstrap {
        c.env("RUSTC_BOOTSTRAP", "1");
    }
    c
}

/// cargo-fuzz from crates.io, built once.
fn setup_cargo_fuzz() -> Result<()> {
    let installed = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if installed.trim_start_matches("cargo-fuzz ").starts_with("0.13") {
        return Ok(());
    }
    step("setup: cargo-fuzz");
    crate::run(cmd("cargo").args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))
}
