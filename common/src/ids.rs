//! Identifiers fleetbench generates (agents, jobs, tasks, runs: 32 lower-case hex digits). Ids that
//! arrive from outside are checked before use: they name rows, and parts of file paths.

use crate::config::ConfigError;

/// Checks that `id` is an id: 1 to 64 lower-case hex digits.
pub fn check(field: &str, id: &str) -> Result<(), ConfigError> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "'{}' is not a fleetbench id (1 to 64 lower-case hex digits)",
                id.chars().take(80).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_hex() {
        assert!(super::check("run_id", "0123456789abcdef0123456789abcdef").is_ok());
        for bad in ["", "../../etc/passwd", "ABC", "a b", &"a".repeat(65)] {
            let e = super::check("run_id", bad).unwrap_err();
            assert_eq!(e.field, "run_id");
        }
    }
}
