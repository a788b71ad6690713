//! The one glibc setting the data path needs, and the re-execution that applies it.
//!
//! glibc (2.36, which the images link statically) copies 4 KiB and more with `rep movsb` on CPUs
//! that advertise fast string moves. On AMD EPYC that instruction runs at about 2 GB/s instead of
//! 40 to 70 when the destination lies 1 to 63 bytes past the source modulo 4 KiB. That is where
//! two heap buffers of one power-of-two size sit, a 16-byte chunk header apart, and the data path
//! copies TLS records and HTTP/2 frames between such buffers: under iperf3 `memcpy` was 18% of
//! the agents' CPU, 96% of it in `rep movsb`, and with glibc's vector loop instead it is 8%
//! (docs/PERFORMANCE.md). The vector loop is glibc's own choice below the threshold and on CPUs
//! without fast string moves.
//!
//! glibc reads its tunables once, as a process starts, from `GLIBC_TUNABLES`. So
//! [`reexec_with_vector_memcpy`] executes the process's own binary again, before any thread
//! starts, with the setting added to the variable. It never touches anything else: a setting of
//! the same tunable already there is kept (that is how an operator opts out), and nothing is done
//! where glibc would not read it (secure mode) or not use it (other architectures and libcs).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The environment variable glibc reads its tunables from.
pub const TUNABLES_VAR: &str = "GLIBC_TUNABLES";

/// The tunable: sizes from which glibc copies with `rep movsb`.
pub const REP_MOVSB_THRESHOLD: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// Its value here: larger than any copy the data path makes.
const NEVER: &str = "4294967295";

/// Executes this process's binary again, with the same arguments and `GLIBC_TUNABLES` saying
/// copies never use `rep movsb`, unless the variable has that tunable already. Call it first in
/// `main`, before any thread or file is opened. It returns only when nothing needed doing
/// (`Ok`), or when the re-execution failed (`Err`): the process then runs on as it is, with
/// glibc's default copies.
pub fn reexec_with_vector_memcpy() -> io::Result<()> {
    if !cfg!(all(target_arch = "x86_64", target_env = "gnu")) {
        return Ok(());
    }
    let Some(tunables) = with_vector_memcpy(std::env::var_os(TUNABLES_VAR).as_deref()) else {
        return Ok(());
    };
    // In secure mode (set-user-ID or file capabilities) glibc drops the variable, and the next
    // start would find it missing again: re-executing would never end.
    if secure_mode(&std::fs::read("/proc/self/auxv")?) {
        return Ok(());
    }
    // The binary by its path, not as /proc/self/exe: the kernel names the process (`comm`, what
    // `ps` and `pkill` match) after the file executed.
    let binary = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    Err(Command::new(binary).arg0(arg0).args(args).env(TUNABLES_VAR, tunables).exec())
}

/// `GLIBC_TUNABLES` with [`REP_MOVSB_THRESHOLD`] added, or `None` when `current` sets it already.
fn with_vector_memcpy(current: Option<&OsStr>) -> Option<OsString> {
    let setting = format!("{REP_MOVSB_THRESHOLD}={NEVER}");
    let Some(current) = current.filter(|c| !c.is_empty()) else {
        return Some(setting.into());
    };
    let has_it = current.as_bytes().split(|&b| b == b':').any(|entry| {
        entry.strip_prefix(REP_MOVSB_THRESHOLD.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'='))
    });
    if has_it {
        return None;
    }
    let mut tunables = current.to_os_string();
    tunables.push(":");
    tunables.push(setting);
    Some(tunables)
}

/// Whether the auxiliary vector (`/proc/self/auxv`: native-endian pairs of words, type then
/// value) says the process runs in secure mode (`AT_SECURE`, type 23, not 0).
fn secure_mode(auxv: &[u8]) -> bool {
    const AT_SECURE: usize = 23;
    const WORD: usize = std::mem::size_of::<usize>();
    let word = |bytes: &[u8]| usize::from_ne_bytes(bytes.try_into().expect("a word"));
    auxv.chunks_exact(2 * WORD).any(|pair| word(&pair[..WORD]) == AT_SECURE && word(&pair[WORD..]) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_added_beside_others_and_an_operators_own_is_kept() {
        let ours = format!("{REP_MOVSB_THRESHOLD}={NEVER}");
        let cases: &[(Option<&str>, Option<String>)] = &[
            (None, Some(ours.clone())),
            (Some(""), Some(ours.clone())),
            (Some("glibc.malloc.arena_max=2"), Some(format!("glibc.malloc.arena_max=2:{ours}"))),
            // The operator's value of the same tunable stands, wherever it is in the list.
            (Some("glibc.cpu.x86_rep_movsb_threshold=8192"), None),
            (Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=8192"), None),
            // A tunable whose name only starts like ours is another one.
            (
                Some("glibc.cpu.x86_rep_movsb_threshold_x=1"),
                Some(format!("glibc.cpu.x86_rep_movsb_threshold_x=1:{ours}")),
            ),
        ];
        for (current, want) in cases {
            let got = with_vector_memcpy(current.map(OsStr::new));
            assert_eq!(got, want.as_ref().map(OsString::from), "GLIBC_TUNABLES={current:?}");
        }
    }

    #[test]
    fn secure_mode_is_read_from_the_auxiliary_vector() {
        let auxv = |pairs: &[(usize, usize)]| -> Vec<u8> {
            pairs.iter().flat_map(|&(t, v)| [t.to_ne_bytes(), v.to_ne_bytes()]).flatten().collect()
        };
        assert!(secure_mode(&auxv(&[(6, 4096), (23, 1), (0, 0)])));
        assert!(!secure_mode(&auxv(&[(6, 4096), (23, 0), (0, 0)])));
        assert!(!secure_mode(&auxv(&[(6, 4096), (0, 0)])));
        // This test runs as a plain process.
        assert!(!secure_mode(&std::fs::read("/proc/self/auxv").expect("/proc/self/auxv")));
    }
}
