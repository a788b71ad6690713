//! How every ferrymesh binary ends: an error reaches the user as one line, `Error: ` and the
//! error with its causes (`outer: cause: root cause`), never a backtrace, whatever
//! RUST_BACKTRACE says.

use std::error::Error;
use std::process::ExitCode;

/// The exit code of `result`, having printed its error (if any) on one line to stderr.
pub fn report<E: AsRef<dyn Error + Send + Sync + 'static>>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `Error: <e>: <its cause>: ...` on one line (see [`error_chain`]).
pub fn one_line(e: &(dyn Error + 'static)) -> String {
    let text = error_chain(e);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    format!("Error: {}", lines.join(" "))
}

/// An error and its sources, `: `-separated (tonic's transport errors, for one, say only
/// "transport error" at the top); a source whose text is already said (an error that prints its
/// source itself) is left out.
pub fn error_chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::fmt;

    /// `outer` caused by `inner`, printing it (`shows_source`) or not.
    #[derive(Debug)]
    struct Outer {
        inner: std::io::Error,
        shows_source: bool,
    }

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.shows_source {
                true => write!(f, "cannot read /x:\n  {}", self.inner),
                false => write!(f, "cannot read /x"),
            }
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.inner)
        }
    }

    #[test]
    fn the_whole_chain_on_one_line_each_cause_once() {
        for shows_source in [false, true] {
            let e = Outer { inner: std::io::Error::other("no such file"), shows_source };
            assert_eq!(super::one_line(&e), "Error: cannot read /x: no such file", "shows_source: {shows_source}");
        }
    }
}
