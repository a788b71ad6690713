//! Reading what tcpdump captured (pcap files of an Ethernet device), for tests that check what
//! crosses the wire.

/// TCP payloads (source port, destination port, bytes) of the IPv4 packets of an Ethernet
/// pcap file.
pub fn tcp_payloads(pcap: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    tcp_payloads_of(pcap, false)
}

/// TCP payloads (source port, destination port, bytes) of the IPv6 packets (TCP right after
/// the fixed header) of an Ethernet pcap file.
pub fn tcp6_payloads(pcap: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    tcp_payloads_of(pcap, true)
}

fn tcp_payloads_of(pcap: &[u8], v6: bool) -> Vec<(u16, u16, Vec<u8>)> {
    assert!(pcap.len() >= 24 && pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1], "little-endian microsecond pcap");
    assert_eq!(u32::from_le_bytes(pcap[20..24].try_into().unwrap()), 1, "Ethernet link type");
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= pcap.len() {
        let len = u32::from_le_bytes(pcap[off + 8..off + 12].try_into().unwrap()) as usize;
        let frame = &pcap[off + 16..(off + 16 + len).min(pcap.len())];
        off += 16 + len;
        let tcp = match v6 {
            false if frame.len() >= 34 && frame[12..14] == [0x08, 0x00] && frame[23] == 6 => {
                let ip = &frame[14..];
                let ihl = usize::from(ip[0] & 0xf) * 4;
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
                &ip[ihl..total]
            }
            true if frame.len() >= 74 && frame[12..14] == [0x86, 0xdd] && frame[20] == 6 => {
                let ip = &frame[14..];
                let total = (40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))).min(ip.len());
                &ip[40..total]
            }
            _ => continue,
        };
        let data_off = usize::from(tcp[12] >> 4) * 4;
        let (sport, dport) = (u16::from_be_bytes([tcp[0], tcp[1]]), u16::from_be_bytes([tcp[2], tcp[3]]));
        out.push((sport, dport, tcp[data_off..].to_vec()));
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
