//! Properties of the address guard and the request validator, over generated input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use destinations_core::parse_strict;
use destinations_http::{HttpRequest, non_public_class};
use proptest::prelude::*;

/// Every IPv6 form that carries an IPv4 address.
fn carriers(v4: Ipv4Addr) -> Vec<Ipv6Addr> {
    let [a, b, c, d] = v4.octets();
    let (hi, lo) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
    vec![
        v4.to_ipv6_mapped(),
        Ipv6Addr::new(0, 0, 0, 0, 0, 0, hi, lo), // IPv4-compatible
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo), // NAT64
        Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1), // 6to4
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, !hi, !lo), // Teredo (client address inverted)
    ]
}

proptest! {
    /// An IPv4 address that is not public is not public in any IPv6 form that carries it.
    #[test]
    fn a_non_public_ipv4_address_stays_non_public_inside_ipv6(raw in any::<u32>()) {
        let v4 = Ipv4Addr::from(raw);
        if non_public_class(IpAddr::V4(v4)).is_some() {
            for v6 in carriers(v4) {
                prop_assert!(non_public_class(IpAddr::V6(v6)).is_some(), "{v4} as {v6}");
            }
        }
    }

    /// The well-known non-public ranges are refused whatever the host part.
    #[test]
    fn non_public_ranges_are_refused_whatever_the_host_part(host in any::<u32>()) {
        for (net, bits) in [
            (Ipv4Addr::new(127, 0, 0, 0), 8),
            (Ipv4Addr::new(10, 0, 0, 0), 8),
            (Ipv4Addr::new(172, 16, 0, 0), 12),
            (Ipv4Addr::new(192, 168, 0, 0), 16),
            (Ipv4Addr::new(169, 254, 0, 0), 16),
            (Ipv4Addr::new(100, 64, 0, 0), 10),
            (Ipv4Addr::new(0, 0, 0, 0), 8),
        ] {
            let mask = u32::MAX >> bits;
            let ip = Ipv4Addr::from(u32::from(net) | (host & mask));
            prop_assert!(non_public_class(IpAddr::V4(ip)).is_some(), "{ip}");
        }
    }

    /// Whatever it is given, the validator does not panic, and what it accepts has a URL with
    /// no control character or space and headers that cannot inject.
    #[test]
    fn what_the_validator_accepts_is_safe_to_send(
        url in "(https?://)?[a-z0-9.:/?#@%\\[\\] \t\r\n\u{0}-\u{1f}-]{0,40}",
        method in prop::sample::select(vec!["GET", "POST", "get", "CONNECT", "TRACE", "PATCH", ""]),
        header_name in "[A-Za-z\r\n: -]{0,12}",
        header_value in "[ -~\r\n\t]{0,12}",
    ) {
        let payload = serde_json::json!({
            "url": url,
            "method": method,
            "headers": {header_name.clone(): &header_value},
        });
        let bytes = serde_json::to_vec(&payload).unwrap_or_default();
        if let Ok(request) = parse_strict::<HttpRequest>(&bytes)
            && request.check().is_ok()
        {
            prop_assert!(!url.chars().any(|c| c.is_control() || c.is_whitespace()), "{url:?}");
            prop_assert!(!header_name.contains(['\r', '\n']) && !header_value.contains(['\r', '\n']));
            prop_assert!(!["CONNECT", "TRACE", "get", ""].contains(&method));
            prop_assert!(url.starts_with("http://") || url.starts_with("https://"), "{url:?}");
        }
    }
}
