//! Operator labels (`tier=edge`, `cost_per_hour=0.05`) and label selectors.

use std::collections::BTreeMap;

/// The label that carries a platform's hourly price. It is not part of the platform fingerprint.
pub const COST_LABEL: &str = "cost_per_hour";

/// Labels keyed by name, ordered so that renderings and fingerprints are stable.
pub type Labels = BTreeMap<String, String>;

/// Errors in labels and selectors.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LabelError {
    /// Not of the form key=value.
    #[error("label '{0}' is not of the form key=value")]
    Malformed(String),
    /// A key with characters outside [A-Za-z0-9_.-].
    #[error("label key '{0}' may only hold letters, digits, '_', '.' and '-'")]
    BadKey(String),
    /// cost_per_hour that is not a non-negative number.
    #[error("label cost_per_hour='{0}' is not a non-negative number")]
    BadCost(String),
}

/// Parses one `key=value` label.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| LabelError::Malformed(s.to_string()))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(LabelError::Malformed(s.to_string()));
    }
    if !k
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(LabelError::BadKey(k.to_string()));
    }
    let v = v.trim().to_string();
    if k == COST_LABEL {
        parse_cost(&v)?;
    }
    Ok((k.to_string(), v))
}

/// Parses a list of labels, later ones overriding earlier ones; also accepts comma-separated lists.
pub fn parse_labels<S: AsRef<str>>(items: &[S]) -> Result<Labels, LabelError> {
    let mut out = Labels::new();
    for item in items {
        for part in item.as_ref().split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = parse_label(part)?;
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Parses a cost_per_hour value.
pub fn parse_cost(v: &str) -> Result<f64, LabelError> {
    match v.parse::<f64>() {
        Ok(c) if c.is_finite() && c >= 0.0 => Ok(c),
        _ => Err(LabelError::BadCost(v.to_string())),
    }
}

/// The hourly cost from a label set, when it has a valid one.
pub fn cost_per_hour(labels: &Labels) -> Option<f64> {
    labels.get(COST_LABEL).and_then(|v| parse_cost(v).ok())
}

/// True when `labels` has every key of `selector` with the same value. An empty selector matches all.
pub fn matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `k=v, k2=v2` rendering.
pub fn render(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let labels = parse_labels(&["tier=edge", "cost_per_hour=0.05,zone=eu"]).unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(cost_per_hour(&labels), Some(0.05));
        assert!(matches(&parse_labels(&["tier=edge"]).unwrap(), &labels));
        assert!(!matches(&parse_labels(&["tier=cloud"]).unwrap(), &labels));
        assert!(matches(&Labels::new(), &labels));
    }

    #[test]
    fn rejects_bad_labels() {
        assert_eq!(
            parse_label("tier"),
            Err(LabelError::Malformed("tier".into()))
        );
        assert_eq!(parse_label("=x"), Err(LabelError::Malformed("=x".into())));
        assert_eq!(
            parse_label("ti er=x"),
            Err(LabelError::BadKey("ti er".into()))
        );
        assert_eq!(
            parse_label("cost_per_hour=-1"),
            Err(LabelError::BadCost("-1".into()))
        );
        assert_eq!(
            parse_label("cost_per_hour=cheap"),
            Err(LabelError::BadCost("cheap".into()))
        );
    }
}
