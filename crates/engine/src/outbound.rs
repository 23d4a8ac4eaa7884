//! Where the built-in `http` handler may connect. A template is user input: without a policy,
//! anyone who can register one can make the server call its own loopback services, the
//! machine's private network or a cloud metadata address, and read the answer back from the
//! step's results. So by default every destination whose *resolved* address is internal is
//! refused, and a deployment opens what it needs with an allowlist of hosts and networks.
//!
//! The check sits where it cannot be dodged: in the DNS resolver the client connects through
//! (the client connects only to the addresses the resolver hands it, so no gap lies between
//! the check and the connection, and a name that resolves to an internal address is refused
//! whatever it is called), and for URLs that name an IP address directly (which bypass the
//! resolver), before the request and on every redirect.

use ipnet::IpNet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tasker_domain::HostPattern;

/// The setting that opens destinations, named in every refusal so the reader knows the fix.
pub const ALLOW_SETTING: &str = "--http-allow (TASKER_HTTP_ALLOW, http_allow in the TOML file)";

/// What the `http` handler may reach beyond the public internet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    /// Host names whose every address is allowed (`billing.internal`, or `*.internal` for
    /// every subdomain).
    hosts: Vec<HostPattern>,
    /// Networks whose addresses are allowed (`10.1.0.0/16`, `127.0.0.1/32`).
    networks: Vec<IpNet>,
}

/// Why a destination was refused; also the error the resolver and redirect policy return, so
/// the handler can find it in a failed request's causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The host as the URL names it.
    pub host: String,
    /// The address it resolved to.
    pub address: IpAddr,
    /// The rule that refused it.
    pub rule: &'static str,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = match self.address {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let literal = tasker_domain::host::ip_literal(&self.host).is_some();
        let named = if literal {
            format!("{address} is")
        } else {
            format!("{} resolves to {address},", self.host)
        };
        write!(
            f,
            "the destination is refused: {named} a {} address; allow it with {ALLOW_SETTING}, e.g. --http-allow {}",
            self.rule,
            if literal { address } else { self.host.clone() }
        )
    }
}

impl std::error::Error for Refusal {}

impl OutboundPolicy {
    /// The policy of these allowlist entries: host names (`api.internal`, `*.internal`), IP
    /// addresses, or networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`).
    pub fn allowing<S: AsRef<str>>(entries: &[S]) -> crate::Result<OutboundPolicy> {
        let mut policy = OutboundPolicy::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            let invalid = |reason: &str| crate::Error::OutboundRule {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            };
            if entry.is_empty() {
                continue;
            }
            if let Ok(network) = entry.parse::<IpNet>() {
                policy.networks.push(canonical(network.trunc()));
            } else if let Some(address) = tasker_domain::host::ip_literal(entry) {
                policy.networks.push(IpNet::from(address.to_canonical()));
            } else if entry.contains('/') {
                return Err(invalid("not a network in CIDR notation"));
            } else {
                let pattern = HostPattern::parse(entry)
                    .ok_or_else(|| invalid("not a host name, an IP address or a network (CIDR)"))?;
                policy.hosts.push(pattern);
            }
        }
        Ok(policy)
    }

    /// This policy, also allowing one address (the server's own, for `--demo`'s services).
    pub fn also_allowing(mut self, address: IpAddr) -> OutboundPolicy {
        self.networks.push(IpNet::from(address.to_canonical()));
        self
    }

    /// Checks one address the host resolved to (or names). An allowed host name opens every
    /// address but link-local ones: cloud metadata answers there, and a name's DNS may be
    /// less trustworthy than the name (a dangling record under an allowed domain); a network
    /// entry opens them.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), Refusal> {
        // An IPv4 address written as IPv6 (`::ffff:127.0.0.1`) is that IPv4 address.
        let address = address.to_canonical();
        if self.networks.iter().any(|net| net.contains(&address)) {
            return Ok(());
        }
        let Some(rule) = internal_rule(address) else {
            return Ok(());
        };
        let named = self.hosts.iter().any(|pattern| pattern.matches(host));
        if named && !rule.starts_with(LINK_LOCAL) {
            return Ok(());
        }
        Err(Refusal {
            host: host.to_owned(),
            address,
            rule,
        })
    }

    /// Checks a URL whose host is an IP address (the resolver never sees those); a host name
    /// is left to the resolver.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refusal> {
        let Some(host) = url.host_str() else {
            return Ok(());
        };
        match tasker_domain::host::ip_literal(host) {
            Some(address) => self.check(host, address),
            None => Ok(()),
        }
    }
}

/// How the link-local rules begin: the ones an allowed host name does not open.
const LINK_LOCAL: &str = "link-local";

/// A network of IPv4 addresses written as IPv6 (`::ffff:10.0.0.0/104`) as the IPv4 network it
/// is, since addresses are checked in their IPv4 form.
fn canonical(network: IpNet) -> IpNet {
    match network {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(network, IpNet::V4),
            None => network,
        },
        other => other,
    }
}

/// The rule that makes an address internal, if one does.
fn internal_rule(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    if v4.is_loopback() {
        Some("loopback")
    } else if v4.is_private() {
        Some("private (RFC 1918)")
    } else if v4.is_link_local() {
        Some("link-local (169.254.0.0/16, where cloud metadata services answer)")
    } else if v4.is_unspecified() || a == 0 {
        // 0.0.0.0/8: connecting to it reaches this machine.
        Some("unspecified (0.0.0.0/8)")
    } else if v4.is_broadcast() {
        Some("broadcast")
    } else if v4.is_multicast() {
        Some("multicast")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT, 100.64.0.0/10)")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignment (192.0.0.0/24)")
    } else if a == 198 && (b == 18 || b == 19) {
        Some("benchmarking (198.18.0.0/15)")
    } else if a >= 240 {
        Some("reserved (240.0.0.0/4)")
    } else {
        None
    }
}

fn internal_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let segments = v6.segments();
    if v6.is_loopback() {
        Some("loopback")
    } else if v6.is_unspecified() {
        Some("unspecified")
    } else if v6.is_multicast() {
        Some("multicast")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local, RFC 4193)")
    } else if segments[0] & 0xffc0 == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else if segments[0] & 0xffc0 == 0xfec0 {
        Some("site-local (fec0::/10)")
    } else if segments[0] == 0x2001 && segments[1] == 0 {
        // Teredo tunnels reach IPv4 hosts through a relay.
        Some("Teredo tunnel (2001::/32)")
    } else if let Some(embedded) = embedded_v4(v6) {
        // NAT64 and 6to4 addresses carry an IPv4 address that the network may reach.
        internal_v4(embedded)
    } else {
        None
    }
}

/// The IPv4 address inside a NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48), 6to4
/// (2002::/16), IPv4-translated (::ffff:0:0:0/96) or IPv4-compatible (::/96) address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let from = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1);
    let translated = s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0;
    if nat64 || translated {
        Some(from(s[6], s[7]))
    } else if s[0] == 0x2002 {
        Some(from(s[1], s[2]))
    } else if s[..6] == [0, 0, 0, 0, 0, 0] {
        Some(from(s[6], s[7]))
    } else {
        None
    }
}

/// The resolver of the `http` handler's client: the system's lookup, then the policy on every
/// address. Only the addresses that pass are handed to the connector; if none passes, the
/// request fails with the first refusal.
pub(crate) struct CheckedResolver {
    pub(crate) policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|address| match policy.check(&host, address.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            // The connector gets only the allowed addresses, so a name that answers with
            // public and internal ones can only ever reach the public ones.
            match refusal {
                Some(refused) if allowed.is_empty() => {
                    Err(Box::new(refused) as Box<dyn std::error::Error + Send + Sync>)
                }
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The refusal among an error's causes, if the policy is why a request failed.
pub(crate) fn refusal_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(refusal) = current.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        cause = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &OutboundPolicy, host: &str, address: &str) -> Option<&'static str> {
        policy
            .check(host, address.parse().unwrap())
            .err()
            .map(|refusal| refusal.rule)
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let policy = OutboundPolicy::default();
        for (address, rule) in [
            ("127.0.0.1", "loopback"),
            ("127.9.9.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("100.64.0.1", "shared"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fd00::1", "private"),
            ("fc00::1", "private"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b:1::a00:1", "private"),
            ("::ffff:0:a9fe:a9fe", "link-local"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ] {
            let got = refused(&policy, address, address);
            assert!(
                got.is_some_and(|got| got.starts_with(rule)),
                "{address}: {got:?}"
            );
        }
        for public in [
            "93.184.215.14",
            "8.8.8.8",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(refused(&policy, public, public), None, "{public}");
        }
    }

    #[test]
    fn the_allowlist_opens_hosts_networks_and_addresses() {
        let policy = OutboundPolicy::allowing(&[
            "billing.internal",
            "*.corp.example",
            "10.1.0.0/16",
            "127.0.0.1",
            "[::1]",
        ])
        .unwrap();
        assert_eq!(refused(&policy, "billing.internal", "10.9.9.9"), None);
        assert_eq!(refused(&policy, "BILLING.internal.", "10.9.9.9"), None);
        assert_eq!(refused(&policy, "a.corp.example", "192.168.0.1"), None);
        assert!(refused(&policy, "corp.example", "192.168.0.1").is_some());
        assert!(refused(&policy, "evilcorp.example", "192.168.0.1").is_some());
        assert_eq!(refused(&policy, "x", "10.1.200.3"), None);
        assert!(refused(&policy, "x", "10.2.0.1").is_some());
        assert_eq!(refused(&policy, "127.0.0.1", "127.0.0.1"), None);
        assert!(refused(&policy, "127.0.0.2", "127.0.0.2").is_some());
        assert_eq!(refused(&policy, "::1", "::1"), None);
        assert_eq!(refused(&policy, "x", "::ffff:127.0.0.1"), None);
        // A network written in its IPv6 form holds the IPv4 addresses it means.
        let mapped = OutboundPolicy::allowing(&["::ffff:10.0.0.0/104"]).unwrap();
        assert_eq!(refused(&mapped, "x", "10.3.2.1"), None);
        assert!(refused(&mapped, "x", "11.0.0.1").is_none(), "public anyway");
        assert!(refused(&mapped, "x", "192.168.0.1").is_some());
        // An allowed name does not open link-local addresses (cloud metadata); a network does.
        assert!(refused(&policy, "billing.internal", "169.254.169.254").is_some());
        assert!(refused(&policy, "a.corp.example", "fe80::1").is_some());
        let metadata = OutboundPolicy::allowing(&["169.254.169.254"]).unwrap();
        assert_eq!(
            refused(&metadata, "metadata.internal", "169.254.169.254"),
            None
        );
        let everything = OutboundPolicy::allowing(&["0.0.0.0/0", "::/0"]).unwrap();
        assert_eq!(refused(&everything, "x", "169.254.169.254"), None);
        assert_eq!(refused(&everything, "x", "fe80::1"), None);
    }

    #[test]
    fn bad_entries_are_explained() {
        for bad in ["10.0.0.0/33", "a b", "http://x", "*.", "fe80::/129"] {
            let err = OutboundPolicy::allowing(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn refusals_name_the_rule_and_the_setting() {
        let policy = OutboundPolicy::default();
        let refusal = policy
            .check("metadata.cloud", "169.254.169.254".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(refusal.contains("metadata.cloud resolves to 169.254.169.254"));
        assert!(refusal.contains("link-local"));
        assert!(refusal.contains("--http-allow metadata.cloud"));
        let url = reqwest::Url::parse("http://[::1]:9/x").unwrap();
        let refusal = policy.check_url(&url).unwrap_err().to_string();
        assert!(refusal.contains("[::1] is a loopback address"), "{refusal}");
        // The URL parser reads the odd spellings of an address as the address.
        let url = reqwest::Url::parse("http://0x7f.1:9/").unwrap();
        assert!(policy.check_url(&url).is_err());
        let url = reqwest::Url::parse("http://example.com/").unwrap();
        assert!(policy.check_url(&url).is_ok());
    }
}
