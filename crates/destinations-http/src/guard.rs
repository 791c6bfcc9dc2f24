//! The SSRF guard: no connection to loopback, private, link-local, CGNAT, multicast or other
//! non-public addresses unless the instance allow-lists the network. Checked on the address
//! actually connected to (the resolver's answer), so DNS rebinding cannot slip past it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// Which addresses an instance may connect to.
#[derive(Clone, Debug, Default)]
pub struct AddressGuard {
    allowed: Vec<IpNet>,
}

/// A connection was refused by the guard.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Refused {
    /// The host as written in the URL.
    pub host: String,
    /// The addresses refused, with their class.
    pub addresses: Vec<(IpAddr, &'static str)>,
}

impl fmt::Display for Refused {
    /// The classes only: the resolved addresses stay out of the message (it reaches API
    /// callers through statuses, and would map internal DNS for them). They are logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut classes: Vec<&str> = self.addresses.iter().map(|(_, class)| *class).collect();
        classes.dedup();
        write!(
            f,
            "refused to connect to `{}`: it is a {} address, not a public one; \
             allow-list the network in this destination's `allow_networks` to permit it",
            self.host,
            classes.join(" / ")
        )
    }
}

impl AddressGuard {
    /// A guard that also admits these networks.
    pub fn allowing(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    /// Whether `ip` may be connected to; if not, why.
    pub fn check(&self, ip: IpAddr) -> Result<(), &'static str> {
        match non_public_class(ip) {
            None => Ok(()),
            Some(_) if self.allowed.iter().any(|net| net.contains(&ip)) => Ok(()),
            Some(class) => Err(class),
        }
    }

    /// Check a URL whose host is an IP literal (literals never reach the resolver); a URL
    /// with a host name passes here and is checked when it is resolved.
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        let ip: IpAddr = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.into(),
            Some(url::Host::Ipv6(ip)) => ip.into(),
            _ => return Ok(()),
        };
        self.check(ip).map_err(|class| Refused {
            host: url.host_str().unwrap_or_default().to_owned(),
            addresses: vec![(ip, class)],
        })
    }

    /// Check the addresses of `host`; keep those allowed, or say why none is.
    pub fn filter(
        &self,
        host: &str,
        addresses: Vec<SocketAddr>,
    ) -> Result<Vec<SocketAddr>, Refused> {
        let mut refused = Vec::new();
        let allowed: Vec<SocketAddr> = addresses
            .into_iter()
            .filter(|a| match self.check(a.ip()) {
                Ok(()) => true,
                Err(class) => {
                    refused.push((a.ip(), class));
                    false
                }
            })
            .collect();
        if allowed.is_empty() {
            return Err(Refused {
                host: host.to_owned(),
                addresses: refused,
            });
        }
        Ok(allowed)
    }
}

/// The class of a non-public address, or `None` for a public one.
pub fn non_public_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => v6_class(v6),
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, b, _) if (16..32).contains(&b) => "private",
        (169, 254, _) => "link-local",
        (100, b, _) if (64..128).contains(&b) => "carrier-grade NAT",
        (0, _, _) => "unspecified",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        (192, 0, 0) => "IETF protocol assignments",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18 | 19, _) => "benchmarking",
        (192, 88, 99) => "6to4 relay anycast",
        _ => return None,
    })
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let segments = ip.segments();
    Some(match segments[0] {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        s if s & 0xfe00 == 0xfc00 => "unique local (private)",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        0x2001 if segments[1] == 0x0db8 => "documentation",
        // NAT64 (64:ff9b::/96) carries an IPv4 address in its last 32 bits.
        0x0064 if segments[1] == 0xff9b && segments[2..6] == [0, 0, 0, 0] => {
            let [.., hi, lo] = segments;
            return v4_class(Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
        }
        // Local-use NAT64 (64:ff9b:1::/48).
        0x0064 if segments[1] == 0xff9b && segments[2] == 1 => "local-use NAT64",
        // IPv4-compatible (::/96, deprecated) carries an IPv4 address too.
        0 if segments[..6] == [0, 0, 0, 0, 0, 0] => "IPv4-compatible",
        // 6to4 (2002::/16) embeds an IPv4 address; Teredo (2001::/32) tunnels to one.
        0x2002 => "6to4",
        0x2001 if segments[1] == 0 => "Teredo",
        // IETF protocol assignments (2001::/23, beside the public ones inside it).
        0x2001 if segments[1] < 0x0200 => "IETF protocol assignments",
        // Discard-only (100::/64).
        0x0100 if segments[1..4] == [0, 0, 0] => "discard-only",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(ip: &str) -> Option<&'static str> {
        non_public_class(ip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
    }

    #[test]
    fn classifies_non_public_ranges() {
        for (ip, expected) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("fd00::1", "unique local (private)"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("64:ff9b::a00:1", "private"),
            ("::7f00:1", "IPv4-compatible"),
            ("::a00:1", "IPv4-compatible"),
            ("2002:7f00:1::", "6to4"),
            ("2001:0:4136:e378::1", "Teredo"),
            ("64:ff9b:1::a00:1", "local-use NAT64"),
            ("100::1", "discard-only"),
            ("2001:10::1", "IETF protocol assignments"),
            ("192.88.99.1", "6to4 relay anycast"),
        ] {
            assert_eq!(class(ip), Some(expected), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "93.184.216.34",
            "2001:4860:4860::8888",
            "2a00:1450::1",
        ] {
            assert_eq!(class(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn allow_list_admits_only_its_networks() {
        let guard = AddressGuard::allowing(vec![
            "127.0.0.0/8".parse().unwrap_or_else(|_| unreachable!()),
        ]);
        assert!(
            guard
                .check(
                    "127.0.0.1"
                        .parse()
                        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                )
                .is_ok()
        );
        assert_eq!(
            guard.check(
                "10.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            ),
            Err("private")
        );
        let refused = AddressGuard::default()
            .filter(
                "localhost",
                vec!["127.0.0.1:80".parse().unwrap_or_else(|_| unreachable!())],
            )
            .unwrap_err();
        assert!(
            refused.to_string().contains("is a loopback address"),
            "{refused}"
        );
        assert!(
            !refused.to_string().contains("127.0.0.1"),
            "the resolved address stays out of the message: {refused}"
        );
        assert!(refused.to_string().contains("allow_networks"), "{refused}");
    }
}
