//! Raw HTTP/2 frames, for tests that must send what a well-behaved client library never would
//! (a burst of streams each reset at once, frames in any order, malformed ones) and read back
//! exactly what a server answered (a GOAWAY and its code). Header blocks use HPACK literals
//! without indexing or Huffman coding, which every decoder must accept.

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 section 6).
pub mod kind {
    /// DATA
    pub const DATA: u8 = 0x0;
    /// HEADERS
    pub const HEADERS: u8 = 0x1;
    /// RST_STREAM
    pub const RST_STREAM: u8 = 0x3;
    /// SETTINGS
    pub const SETTINGS: u8 = 0x4;
    /// PING
    pub const PING: u8 = 0x6;
    /// GOAWAY
    pub const GOAWAY: u8 = 0x7;
    /// WINDOW_UPDATE
    pub const WINDOW_UPDATE: u8 = 0x8;
    /// CONTINUATION
    pub const CONTINUATION: u8 = 0x9;
}

/// Flags.
pub mod flag {
    /// END_STREAM (DATA, HEADERS); ACK (SETTINGS, PING).
    pub const END_STREAM: u8 = 0x1;
    /// END_HEADERS (HEADERS, CONTINUATION).
    pub const END_HEADERS: u8 = 0x4;
}

/// Error codes.
pub mod code {
    /// CANCEL
    pub const CANCEL: u32 = 0x8;
    /// ENHANCE_YOUR_CALM
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One frame as it is on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id (the reserved bit cleared).
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Encodes a frame. Payloads over 2^24 - 1 bytes are cut (the length field has 24 bits).
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(0xff_ffff)];
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix, the prefix's other bits set to `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// An HPACK header block of literals without indexing (new name, no Huffman coding).
pub fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A HEADERS frame (END_HEADERS set) with `headers`.
pub fn headers(stream: u32, headers: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
    let flags = flag::END_HEADERS | if end_stream { flag::END_STREAM } else { 0 };
    frame(kind::HEADERS, flags, stream, &header_block(headers))
}

/// A CONNECT request for `authority` on `stream`, as an HBONE client sends it.
pub fn connect(stream: u32, authority: &str) -> Vec<u8> {
    headers(stream, &[(":method", "CONNECT"), (":authority", authority)], false)
}

/// An empty SETTINGS frame (or its ACK).
pub fn settings(ack: bool) -> Vec<u8> {
    frame(kind::SETTINGS, u8::from(ack), 0, &[])
}

/// RST_STREAM with `code`.
pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(kind::RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The frames in `bytes`, up to the first incomplete one.
pub fn parse_frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        if bytes.len() < 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
        out.push(Frame { kind: bytes[3], flags: bytes[4], stream, payload: bytes[9..9 + len].to_vec() });
        bytes = &bytes[9 + len..];
    }
    out
}

/// The value of setting `id` in the first SETTINGS frame (not an ACK) among `frames`, if it
/// has it.
pub fn setting(frames: &[Frame], id: u16) -> Option<u32> {
    let settings = frames.iter().find(|f| f.kind == kind::SETTINGS && f.flags & flag::END_STREAM == 0)?;
    settings
        .payload
        .chunks_exact(6)
        .find(|p| u16::from_be_bytes([p[0], p[1]]) == id)
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
}

/// The error code of the first GOAWAY among `frames`, if any.
pub fn goaway_code(frames: &[Frame]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.kind == kind::GOAWAY && f.payload.len() >= 8)
        .map(|f| u32::from_be_bytes([f.payload[4], f.payload[5], f.payload[6], f.payload[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_hpack_integers_use_continuation_bytes() {
        let bytes = [connect(1, "10.0.0.1:80"), rst_stream(1, code::CANCEL), settings(true)].concat();
        let frames = parse_frames(&bytes);
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[0].kind, frames[0].flags, frames[0].stream), (kind::HEADERS, flag::END_HEADERS, 1));
        assert_eq!(frames[1].payload, code::CANCEL.to_be_bytes());
        assert_eq!((frames[2].kind, frames[2].flags), (kind::SETTINGS, 1));
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        let mut out = Vec::new();
        hpack_int(&mut out, 0, 5, 1337);
        assert_eq!(out, [31, 154, 10]);
        assert!(parse_frames(&bytes[..bytes.len() - 1]).len() == 2, "an incomplete frame is left out");
        let advertised = frame(kind::SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 5, 0, 1, 0, 0]);
        let frames = parse_frames(&[settings(true), advertised].concat());
        assert_eq!((setting(&frames, 5), setting(&frames, 3), setting(&frames, 4)), (Some(65_536), Some(100), None));
        let goaway = frame(kind::GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0xb]);
        assert_eq!(goaway_code(&parse_frames(&goaway)), Some(code::ENHANCE_YOUR_CALM));
    }
}
