//! A request's path, normalized once before it is authorized, routed and forwarded, as Istio
//! asks Envoy to (MeshConfig `pathNormalization`, Envoy's `normalize_path`, `merge_slashes` and
//! `path_with_escaped_slashes_action`). Without it `/admin`, `//admin`, `/./admin`, `/%61dmin`
//! and `/public/../admin` are five paths to a policy and one to most backends: a DENY on
//! `/admin*` would let four of them through. The waypoint authorizes, routes and forwards the
//! one string this returns, so no backend can read the path differently from the policy.
//!
//! `Base` (the default) is RFC 3986 section 6: percent-encoded unreserved characters decoded
//! (`%61` -> `a`, `%2E` -> `.`), the remaining escapes' hex digits upper-cased, backslashes made
//! slashes (as browsers and Envoy's URL library read them), and dot segments removed (section
//! 5.2.4); a `%` not followed by two hex digits is an invalid encoding, refused. `MergeSlashes`
//! adds merging runs of slashes; `DecodeAndMergeSlashes` adds decoding escaped slashes and
//! backslashes (`%2F`, `%5C`) into slashes. An escaped slash is otherwise handled as its
//! [`EscapedSlashes`] action says: refused by default (a backend that decodes it would read
//! `/public%2F..%2Fadmin` as `/admin`, which no policy saw). A dot segment carrying path
//! parameters (`/public/..;/admin`, which servlet containers read as `/admin`) is refused in
//! every mode but `None`.

use std::fmt;

/// Istio's `pathNormalization.normalization`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathNormalization {
    /// The path as received.
    None,
    /// RFC 3986 normalization (the default).
    #[default]
    Base,
    /// `Base`, and runs of slashes merged into one.
    MergeSlashes,
    /// `MergeSlashes`, and escaped slashes and backslashes decoded first.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// Istio's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Base => "BASE",
            Self::MergeSlashes => "MERGE_SLASHES",
            Self::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    /// The mode of Istio's name `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::None, Self::Base, Self::MergeSlashes, Self::DecodeAndMergeSlashes]
            .into_iter()
            .find(|m| m.as_str() == text)
    }

    /// What is done with an escaped slash unless told otherwise: decoded by
    /// `DecodeAndMergeSlashes`, kept as it is with `None`, refused otherwise.
    pub const fn default_escaped_slashes(self) -> EscapedSlashes {
        match self {
            Self::None => EscapedSlashes::KeepUnchanged,
            Self::Base | Self::MergeSlashes => EscapedSlashes::RejectRequest,
            Self::DecodeAndMergeSlashes => EscapedSlashes::UnescapeAndForward,
        }
    }
}

/// Envoy's `path_with_escaped_slashes_action`: what an escaped slash or backslash (`%2F`,
/// `%5C`, either case) in a path makes of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Left as it is (a backend that decodes it may then see another path than the policy).
    KeepUnchanged,
    /// The request is refused (400).
    RejectRequest,
    /// Decoded into a slash; the request goes on with the decoded path.
    UnescapeAndForward,
    /// Decoded into a slash; the client is redirected (307) to the decoded path.
    UnescapeAndRedirect,
}

impl EscapedSlashes {
    /// Envoy's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::KeepUnchanged => "KEEP_UNCHANGED",
            Self::RejectRequest => "REJECT_REQUEST",
            Self::UnescapeAndForward => "UNESCAPE_AND_FORWARD",
            Self::UnescapeAndRedirect => "UNESCAPE_AND_REDIRECT",
        }
    }

    /// The action of Envoy's name `text`.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::KeepUnchanged, Self::RejectRequest, Self::UnescapeAndForward, Self::UnescapeAndRedirect]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

/// How paths are normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathRules {
    /// The normalization.
    pub normalization: PathNormalization,
    /// What an escaped slash makes of a request.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathRules {
    fn default() -> Self {
        Self::of(PathNormalization::Base)
    }
}

impl PathRules {
    /// `normalization`, with its default escaped-slash action.
    pub const fn of(normalization: PathNormalization) -> Self {
        Self { normalization, escaped_slashes: normalization.default_escaped_slashes() }
    }
}

/// What a path normalizes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Normalized {
    /// The path to authorize, route and forward.
    Path(String),
    /// The client is to be redirected there (an escaped slash with `UnescapeAndRedirect`).
    Redirect(String),
}

/// Why a path is refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding at byte {0} of the path")]
    InvalidEncoding(usize),
    /// An escaped slash or backslash, refused by the rules.
    #[error("an escaped slash or backslash (%2F, %5C) in the path is refused (path_with_escaped_slashes_action REJECT_REQUEST)")]
    EscapedSlash,
    /// A dot segment with parameters (`..;x`, `.;x`): servlet containers read it as a dot
    /// segment, RFC 3986 does not, so it would mean one path to the policy and another to them.
    #[error("a dot segment with parameters (`..;`, `.;`) in the path is refused")]
    DotSegmentParameters,
}

impl fmt::Display for PathRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, escaped slashes {}", self.normalization.as_str(), self.escaped_slashes.as_str())
    }
}

/// Whether `b` is an RFC 3986 unreserved character.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalizes `path` (without its query) by `rules`.
pub fn normalize(path: &str, rules: &PathRules) -> Result<Normalized, PathError> {
    if rules.normalization == PathNormalization::None || !path.starts_with(['/', '\\']) {
        // `*` (OPTIONS) and authority-form targets have no path to normalize.
        return Ok(Normalized::Path(path.to_string()));
    }
    let decode_slashes = rules.normalization == PathNormalization::DecodeAndMergeSlashes
        || matches!(rules.escaped_slashes, EscapedSlashes::UnescapeAndForward | EscapedSlashes::UnescapeAndRedirect);
    let bytes = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut unescaped_slash = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(high), Some(low)) =
                    (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
                else {
                    return Err(PathError::InvalidEncoding(i));
                };
                let value = high << 4 | low;
                match value {
                    b'/' | b'\\' if decode_slashes => {
                        out.push(b'/');
                        unescaped_slash = true;
                    }
                    b'/' | b'\\' if rules.escaped_slashes == EscapedSlashes::RejectRequest => {
                        return Err(PathError::EscapedSlash);
                    }
                    v if unreserved(v) => out.push(v),
                    v => out.extend_from_slice(format!("%{v:02X}").as_bytes()),
                }
                i += 3;
            }
            b'\\' => {
                out.push(b'/');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII was pushed in place of escapes, and other bytes were copied whole.
    let decoded = String::from_utf8(out).map_err(|_| PathError::InvalidEncoding(0))?;
    let merged = match rules.normalization {
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes => merge_slashes(&decoded),
        _ => decoded,
    };
    if merged.split('/').any(|s| s.split_once(';').is_some_and(|(dots, _)| dots == "." || dots == "..")) {
        return Err(PathError::DotSegmentParameters);
    }
    let normalized = remove_dot_segments(&merged);
    if unescaped_slash && rules.escaped_slashes == EscapedSlashes::UnescapeAndRedirect {
        return Ok(Normalized::Redirect(normalized));
    }
    Ok(Normalized::Path(normalized))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// RFC 3986 section 5.2.4 on an absolute path: `.` segments go, a `..` segment takes the one
/// before it with it (never above the root), and a path that ended in one ends in `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing = i == last,
            ".." => {
                kept.pop();
                trailing = i == last;
            }
            s => {
                kept.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn base(path: &str) -> Result<Normalized, PathError> {
        normalize(path, &PathRules::default())
    }

    fn path(p: &str) -> Result<Normalized, PathError> {
        Ok(Normalized::Path(p.into()))
    }

    #[test]
    fn base_decodes_unreserved_removes_dot_segments_and_refuses_bad_encodings() {
        let cases = [
            ("/", path("/")),
            ("/admin", path("/admin")),
            ("//admin", path("//admin")),
            ("/./admin", path("/admin")),
            ("/%61dmin", path("/admin")),
            ("/public/../admin", path("/admin")),
            ("/public/%2e%2e/admin", path("/admin")),
            ("/public/%2E%2E/admin", path("/admin")),
            ("/public/.%2e/admin", path("/admin")),
            ("/public\\..\\admin", path("/admin")),
            ("/a/b/../../..", path("/")),
            ("/a/./", path("/a/")),
            ("/a/b/..", path("/a/")),
            ("/a/..b/c", path("/a/..b/c")),
            ("/admin;x=1", path("/admin;x=1")),
            ("/public/..;/admin", Err(PathError::DotSegmentParameters)),
            ("/public/%2e%2e;x/admin", Err(PathError::DotSegmentParameters)),
            ("/a/.;b", Err(PathError::DotSegmentParameters)),
            ("/a/...;b/c", path("/a/...;b/c")),
            ("/caf%c3%a9", path("/caf%C3%A9")),
            ("/%25", path("/%25")),
            ("/%2561dmin", path("/%2561dmin")),
            ("/a%20b", path("/a%20b")),
            ("*", path("*")),
            ("/public%2F..%2Fadmin", Err(PathError::EscapedSlash)),
            ("/public/..%5cadmin", Err(PathError::EscapedSlash)),
            ("/admin%zz", Err(PathError::InvalidEncoding(6))),
            ("/admin%2", Err(PathError::InvalidEncoding(6))),
            ("/%", Err(PathError::InvalidEncoding(1))),
        ];
        for (raw, want) in cases {
            assert_eq!(base(raw), want, "{raw}");
        }
    }

    #[test]
    fn each_mode_and_escaped_slash_action() {
        let rules = |n, e| PathRules { normalization: n, escaped_slashes: e };
        let cases = [
            (PathRules::of(PathNormalization::None), "/a/../%2F//b", path("/a/../%2F//b")),
            (PathRules::of(PathNormalization::MergeSlashes), "//a///b/", path("/a/b/")),
            (PathRules::of(PathNormalization::DecodeAndMergeSlashes), "/public%2F..%2F%2Fadmin", path("/admin")),
            (PathRules::of(PathNormalization::DecodeAndMergeSlashes), "/a%5Cb", path("/a/b")),
            (rules(PathNormalization::Base, EscapedSlashes::KeepUnchanged), "/a%2fb/../c", path("/c")),
            (rules(PathNormalization::Base, EscapedSlashes::KeepUnchanged), "/a%2fb", path("/a%2Fb")),
            (rules(PathNormalization::Base, EscapedSlashes::UnescapeAndForward), "/a%2Fb", path("/a/b")),
            (
                rules(PathNormalization::Base, EscapedSlashes::UnescapeAndRedirect),
                "/a%2F..%2Fb",
                Ok(Normalized::Redirect("/b".into())),
            ),
        ];
        for (rules, raw, want) in cases {
            assert_eq!(normalize(raw, &rules), want, "{rules}: {raw}");
        }
        assert_eq!(PathNormalization::parse("MERGE_SLASHES"), Some(PathNormalization::MergeSlashes));
        assert_eq!(EscapedSlashes::parse("REJECT_REQUEST"), Some(EscapedSlashes::RejectRequest));
        assert_eq!(PathNormalization::parse("base"), None);
    }

    /// Paths made of the pieces that matter: slashes, dots, escapes of every kind, names.
    fn paths() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("//"),
            Just("."),
            Just(".."),
            Just("%2e"),
            Just("%2E"),
            Just("%61"),
            Just("%2f"),
            Just("%5C"),
            Just("%25"),
            Just("%c3%a9"),
            Just("\\"),
            Just(";x=1"),
            Just("admin"),
            Just("public"),
            Just("%"),
            Just("a b"),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    fn modes() -> impl Strategy<Value = PathRules> {
        let n = prop_oneof![
            Just(PathNormalization::None),
            Just(PathNormalization::Base),
            Just(PathNormalization::MergeSlashes),
            Just(PathNormalization::DecodeAndMergeSlashes)
        ];
        let e = prop_oneof![
            Just(EscapedSlashes::KeepUnchanged),
            Just(EscapedSlashes::RejectRequest),
            Just(EscapedSlashes::UnescapeAndForward),
            Just(EscapedSlashes::UnescapeAndRedirect)
        ];
        (n, e).prop_map(|(normalization, escaped_slashes)| PathRules { normalization, escaped_slashes })
    }

    proptest! {
        #[test]
        fn normalizing_twice_is_normalizing_once(raw in paths(), rules in modes()) {
            if let Ok(Normalized::Path(once) | Normalized::Redirect(once)) = normalize(&raw, &rules) {
                prop_assert_eq!(normalize(&once, &rules), Ok(Normalized::Path(once.clone())), "{}", raw);
                if rules.normalization != PathNormalization::None {
                    // Nothing a backend would read differently is left.
                    prop_assert!(!once.split('/').any(|s| s == "." || s == ".."), "{}", once);
                    prop_assert!(!once.contains('\\'), "{}", once);
                    let lower = once.to_ascii_lowercase();
                    prop_assert!(!lower.contains("%2e") && !lower.contains("%61"), "{}", once);
                }
            }
        }
    }
}
