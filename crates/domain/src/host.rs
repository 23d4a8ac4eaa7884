//! Host-name patterns of the allowlists (the server's own host names, the `http` handler's
//! destinations): an exact name, or `*.example.com` for every subdomain of a name.

/// The address a host written as an IP address stands for (`10.0.0.1`, `::1`, `[::1]`);
/// `None` for a host name.
pub fn ip_literal(host: &str) -> Option<std::net::IpAddr> {
    host.trim_matches(['[', ']']).parse().ok()
}

/// A host name, or every subdomain of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case, without a trailing dot.
    name: String,
    subdomains: bool,
}

impl HostPattern {
    /// `api.internal` or `*.internal`; `None` for anything that is not a host name (a scheme,
    /// a port, a path, an empty label).
    pub fn parse(text: &str) -> Option<HostPattern> {
        let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let (name, subdomains) = match text.strip_prefix("*.") {
            Some(parent) => (parent.to_owned(), true),
            None => (text, false),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        valid.then_some(HostPattern { name, subdomains })
    }

    /// Whether `host` (any case, trailing dot or not) is this name, or a subdomain of it for
    /// a `*.` pattern. A pattern never matches its parent itself.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.subdomains {
            return host == self.name;
        }
        host.strip_suffix(&self.name)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_are_told_from_names() {
        assert_eq!(ip_literal("10.0.0.1"), Some([10, 0, 0, 1].into()));
        assert_eq!(
            ip_literal("[::1]"),
            Some(std::net::Ipv6Addr::LOCALHOST.into())
        );
        assert_eq!(
            ip_literal("::1"),
            Some(std::net::Ipv6Addr::LOCALHOST.into())
        );
        assert_eq!(ip_literal("localhost"), None);
        assert_eq!(ip_literal("10.0.0.1.example.com"), None);
    }

    #[test]
    fn exact_names_and_subdomains_match() {
        let exact = HostPattern::parse("Billing.Internal.").unwrap();
        assert!(exact.matches("billing.internal"));
        assert!(exact.matches("BILLING.internal."));
        assert!(!exact.matches("a.billing.internal"));
        let any = HostPattern::parse("*.corp.example").unwrap();
        assert!(any.matches("a.corp.example") && any.matches("a.b.corp.example"));
        assert!(!any.matches("corp.example"));
        assert!(!any.matches("evilcorp.example"));
        assert!(!any.matches(".corp.example"));
    }

    #[test]
    fn what_is_not_a_host_name_is_refused() {
        for bad in ["", "*.", "http://x", "x:80", "a b", "a..b", "x/y", "*"] {
            assert_eq!(HostPattern::parse(bad), None, "{bad}");
        }
    }
}
