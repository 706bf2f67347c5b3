//! Name patterns for the `sni` and `host` conditions of routes: an exact DNS
//! name, or `*.` and a name for every name below it (nginx's `*.example.org`).

use std::fmt;

/// Stored lower-case, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    /// `*.suffix`: every name ending in `.suffix`, one or more labels deep;
    /// not `suffix` itself.
    Below(String),
}

/// The longest DNS name, without the trailing dot.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

impl NamePattern {
    /// Reads a pattern as written in a policy. Refuses what could never match
    /// a name the sniffer reports (it only reports valid host names).
    pub fn parse(text: &str) -> Result<NamePattern, String> {
        let pattern = text.strip_suffix('.').unwrap_or(text);
        let (below, name) = match pattern.strip_prefix("*.") {
            Some(suffix) => (true, suffix),
            None => (false, pattern),
        };
        if name.contains('*') {
            return Err(format!(
                "wildcard must be a leading label, like *.example.com, got {text:?}"
            ));
        }
        if name.is_empty() {
            return Err(format!(
                "expected a name like www.example.com, got {text:?}"
            ));
        }
        if pattern.len() > MAX_NAME_LEN {
            return Err(format!(
                "a name is at most {MAX_NAME_LEN} characters, got {}",
                pattern.len()
            ));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(format!("empty label in {text:?}"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "a label is at most {MAX_LABEL_LEN} characters, got {} in {text:?}",
                    label.len()
                ));
            }
            // Underscores are not in the host name grammar but occur in real
            // internal names, and the sniffer lets them through.
            if let Some(c) = label
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            {
                return Err(format!(
                    "{c:?} in {text:?}: a name has letters, digits, '-' and '_' only \
                     (write internationalized names in their xn-- form)"
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(format!("label {label:?} starts or ends with '-'"));
            }
        }
        let name = name.to_ascii_lowercase();
        Ok(if below {
            NamePattern::Below(name)
        } else {
            NamePattern::Exact(name)
        })
    }

    /// Whether `name` (an SNI or Host) matches, ignoring ASCII case and one
    /// trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
        match self {
            NamePattern::Exact(exact) => name.eq_ignore_ascii_case(exact.as_bytes()),
            NamePattern::Below(suffix) => {
                // At least one character, then a dot, then the suffix.
                name.len() > suffix.len() + 1 && {
                    let (head, tail) = name.split_at(name.len() - suffix.len());
                    head.ends_with(b".") && tail.eq_ignore_ascii_case(suffix.as_bytes())
                }
            }
        }
    }

    /// Whether every name `other` matches, this matches too.
    pub fn covers(&self, other: &NamePattern) -> bool {
        match (self, other) {
            (NamePattern::Exact(a), NamePattern::Exact(b)) => a == b,
            (NamePattern::Exact(_), NamePattern::Below(_)) => false,
            (NamePattern::Below(a), NamePattern::Below(b)) if a == b => true,
            (NamePattern::Below(_), NamePattern::Exact(b) | NamePattern::Below(b)) => {
                self.matches(b)
            }
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(name) => f.write_str(name),
            NamePattern::Below(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> NamePattern {
        NamePattern::parse(text).unwrap_or_else(|e| panic!("parse {text:?}: {e}"))
    }

    #[test]
    fn parses_exact_and_wildcard_names() {
        assert_eq!(
            pattern("www.example.com"),
            NamePattern::Exact("www.example.com".to_owned())
        );
        assert_eq!(
            pattern("*.example.com"),
            NamePattern::Below("example.com".to_owned())
        );
        // Case and one trailing dot are not part of the name.
        assert_eq!(
            pattern("WWW.Example.COM."),
            NamePattern::Exact("www.example.com".to_owned())
        );
        assert_eq!(
            pattern("*.Example.com."),
            NamePattern::Below("example.com".to_owned())
        );
        assert_eq!(
            pattern("_acme._tcp.example.org"),
            NamePattern::Exact("_acme._tcp.example.org".to_owned())
        );
        assert_eq!(pattern("*.example.com").to_string(), "*.example.com");
    }

    #[test]
    fn refuses_misplaced_wildcards() {
        for text in [
            "*",
            "*.",
            "*example.com",
            "www.*.example.com",
            "**.example.com",
            "*.*.example.com",
            "example.*",
        ] {
            let err = NamePattern::parse(text).unwrap_err();
            assert!(
                err.starts_with("wildcard must be a leading label, like *.example.com"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_name() {
        for (text, reason) in [
            ("", "expected a name like www.example.com"),
            (".", "expected a name like www.example.com"),
            ("example..com", "empty label"),
            (".example.com", "empty label"),
            ("example.com..", "empty label"),
            ("*..example.com", "empty label"),
            ("www.example.com:443", "':' in"),
            ("ex ample.com", "' ' in"),
            ("bücher.example", "'ü' in"),
            ("-www.example.com", "starts or ends with '-'"),
            ("www-.example.com", "starts or ends with '-'"),
        ] {
            let err = NamePattern::parse(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
        let label = "a".repeat(64);
        assert!(
            NamePattern::parse(&format!("{label}.example.com"))
                .unwrap_err()
                .contains("a label is at most 63 characters, got 64")
        );
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253);
        pattern(&long);
        pattern(&format!("{long}."));
        assert_eq!(
            NamePattern::parse(&format!("x{long}")).unwrap_err(),
            "a name is at most 253 characters, got 254"
        );
    }

    #[test]
    fn exact_names_match_themselves_only() {
        let p = pattern("www.example.com");
        assert!(p.matches("www.example.com"));
        assert!(p.matches("WWW.example.COM"));
        assert!(p.matches("www.example.com."));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.www.example.com"));
        assert!(!p.matches("www.example.co"));
        assert!(!p.matches("wwwexample.com"));
    }

    #[test]
    fn wildcards_match_one_or_more_labels_below() {
        let p = pattern("*.example.com");
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.example.com"));
        assert!(p.matches("A.Example.Com."));
        assert!(!p.matches("example.com"));
        assert!(!p.matches(".example.com"));
        assert!(!p.matches("aexample.com"));
        assert!(!p.matches("a.example.net"));
        assert!(!p.matches("a.example.com.evil.example"));
    }

    #[test]
    fn coverage() {
        let covers = |a: &str, b: &str| pattern(a).covers(&pattern(b));
        assert!(covers("www.example.com", "WWW.example.com."));
        assert!(!covers("www.example.com", "api.example.com"));
        assert!(!covers("www.example.com", "*.example.com"));
        assert!(covers("*.example.com", "www.example.com"));
        assert!(covers("*.example.com", "*.example.com"));
        assert!(covers("*.example.com", "*.api.example.com"));
        assert!(!covers("*.example.com", "example.com"));
        assert!(!covers("*.api.example.com", "*.example.com"));
    }
}
