//! A Kubernetes-style label selector (the syntax Flightctl also accepts), evaluated by the hub to
//! decide which listed devices are enabled.
//!
//! Supported terms, joined by commas (all must hold): `k=v`, `k==v`, `k!=v`, `k`, `!k`,
//! `k in (a,b)`, `k notin (a,b)`. An empty selector matches every device.

use std::collections::BTreeMap;

/// Why a selector string is invalid (configuration error, not retryable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    /// The selector as configured.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    terms: Vec<Term>,
}

impl LabelSelector {
    /// Parses `selector`; an empty or blank string selects everything.
    pub fn parse(selector: &str) -> Result<Self, SelectorError> {
        let err = |reason: &str| SelectorError {
            selector: selector.to_owned(),
            reason: reason.to_owned(),
        };
        let mut terms = Vec::new();
        for raw in split_terms(selector).map_err(|r| err(&r))? {
            let t = raw.trim();
            if t.is_empty() {
                if selector.trim().is_empty() {
                    continue;
                }
                return Err(err("empty term"));
            }
            terms.push(parse_term(t).map_err(|r| err(&r))?);
        }
        Ok(Self { terms })
    }

    /// Whether `labels` satisfy every term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
            Term::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// Splits at commas outside parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

fn check_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    if k.is_empty() {
        return Err("empty key".into());
    }
    if k.chars().any(|c| c.is_whitespace() || "=!(),".contains(c)) {
        return Err(format!("invalid key {k:?}"));
    }
    Ok(k.to_owned())
}

fn check_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.chars().any(|c| c.is_whitespace() || "=!(),".contains(c)) {
        return Err(format!("invalid value {v:?}"));
    }
    Ok(v.to_owned())
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values), got {rest:?}"))?;
    let values = inner
        .split(',')
        .map(check_value)
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().any(String::is_empty) {
        return Err("empty value in set".into());
    }
    Ok(values)
}

fn parse_term(t: &str) -> Result<Term, String> {
    if let Some(k) = t.strip_prefix('!') {
        return Ok(Term::NotExists(check_key(k)?));
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(Term::NotEq(check_key(k)?, check_value(v)?));
    }
    if let Some((k, v)) = t.split_once("==") {
        return Ok(Term::Eq(check_key(k)?, check_value(v)?));
    }
    if let Some((k, v)) = t.split_once('=') {
        return Ok(Term::Eq(check_key(k)?, check_value(v)?));
    }
    let mut words = t.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    match words.next().map(str::trim_start) {
        None => Ok(Term::Exists(check_key(key)?)),
        Some(rest) => {
            if let Some(set) = rest.strip_prefix("notin") {
                Ok(Term::NotIn(check_key(key)?, parse_set(set)?))
            } else if let Some(set) = rest.strip_prefix("in") {
                Ok(Term::In(check_key(key)?, parse_set(set)?))
            } else {
                Err(format!("unknown operator in {t:?}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_selects_all() {
        let s = LabelSelector::parse("  ").expect("parses");
        assert!(s.matches(&labels(&[])));
    }

    #[test]
    fn each_operator() {
        let l = labels(&[("fleetlet", "enabled"), ("site", "lab")]);
        let yes = [
            "fleetlet=enabled",
            "fleetlet==enabled",
            "site!=prod",
            "fleetlet",
            "!missing",
            "site in (lab, prod)",
            "site notin (prod)",
            "missing notin (x)",
            "fleetlet=enabled,site in (lab)",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).expect(s).matches(&l), "{s}");
        }
        let no = [
            "fleetlet=disabled",
            "site!=lab",
            "missing",
            "!site",
            "site in (prod)",
            "site notin (lab,x)",
            "missing in (x)",
            "fleetlet=enabled,site=prod",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).expect(s).matches(&l), "{s}");
        }
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        for s in [
            "a=b,",
            "a in (b",
            "a in b",
            "a foo (b)",
            "=b",
            "a b=c",
            "a in ()",
            "a)",
        ] {
            assert!(LabelSelector::parse(s).is_err(), "{s}");
        }
    }
}
