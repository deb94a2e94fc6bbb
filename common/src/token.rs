//! Token formats shared by the coordinator, the agent and the CLI.
//!
//! - An API token or agent credential: `fbt1.<id>.<secret>`, where `id` (16 hex digits) names the
//!   stored row and `secret` (64 hex digits, 256 random bits) is known only to its holder; the
//!   coordinator keeps its SHA-256.
//! - An agent join token: `fbjoin1:<ca>:<token>`, where `ca` is the hex SHA-256 of the coordinator's
//!   CA certificate (DER) that the agent pins on first contact, as k3s `K10<hash>::` tokens do (empty
//!   for a coordinator without TLS), and `token` an `fbt1` token of role `agent-join`.
//!
//! The [`Secret`] wrapper keeps secrets out of `Debug` output and logs.

use std::fmt;

use sha2::{Digest, Sha256};

/// Prefix of API tokens and agent credentials.
pub const TOKEN_PREFIX: &str = "fbt1";
/// Prefix of agent join tokens.
pub const JOIN_PREFIX: &str = "fbjoin1";

/// A secret string: shown as `<redacted>` by `Debug`; (de)serialised as the plain string, for
/// configuration files.
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the one place that sends or stores it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

/// A parsed `fbt1` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The stored row's id.
    pub id: String,
    /// The secret part.
    pub secret: Secret,
}

impl Token {
    /// A new token with a random id and secret.
    pub fn mint() -> Self {
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rand::fill(&mut id);
        rand::fill(&mut secret);
        Self {
            id: hex::encode(id),
            secret: Secret::new(hex::encode(secret)),
        }
    }

    /// The same id with a new secret (rotation).
    pub fn rotated(&self) -> Self {
        Self {
            id: self.id.clone(),
            ..Self::mint()
        }
    }

    /// Parses `fbt1.<id>.<secret>`; the error says what is wrong without repeating the secret.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let mut parts = s.splitn(3, '.');
        let (prefix, id, secret) = (parts.next(), parts.next(), parts.next());
        match (prefix, id, secret) {
            (Some(TOKEN_PREFIX), Some(id), Some(secret))
                if id.len() == 16
                    && secret.len() == 64
                    && id.bytes().all(|b| b.is_ascii_hexdigit())
                    && secret.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Ok(Self {
                    id: id.to_ascii_lowercase(),
                    secret: Secret::new(secret.to_ascii_lowercase()),
                })
            }
            _ => Err(format!(
                "not a fleetbench token (expected {TOKEN_PREFIX}.<16 hex digits>.<64 hex digits>, as \
                 `fleetbench-coordinator init` and `fleetbench admin tokens create` print them)"
            )),
        }
    }

    /// The token as its holder uses it.
    pub fn to_secret_string(&self) -> Secret {
        Secret::new(format!(
            "{TOKEN_PREFIX}.{}.{}",
            self.id,
            self.secret.expose()
        ))
    }

    /// Hex SHA-256 of the secret part: what the coordinator stores.
    pub fn secret_hash(&self) -> String {
        hash_secret(self.secret.expose())
    }
}

/// Hex SHA-256 of a secret. Secrets are 256 random bits, so a plain hash (no salt, no stretching)
/// cannot be reversed or guessed; what matters is that a stolen database holds no usable secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A DER certificate as PEM text.
pub fn certificate_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Hex SHA-256 of the DER of the first certificate in a PEM text: what join tokens pin, and what
/// `fleetbench-coordinator init` prints as the CA fingerprint.
pub fn ca_fingerprint(pem_text: &str) -> Result<String, String> {
    let der = pem::parse_many(pem_text)
        .map_err(|e| format!("not a PEM file: {e}"))?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .ok_or_else(|| "no PEM certificate found".to_string())?;
    Ok(hex::encode(Sha256::digest(der)))
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex SHA-256 of the CA certificate's DER; empty for a coordinator without TLS.
    pub ca_sha256: String,
    /// The `agent-join` token.
    pub token: Token,
}

impl JoinToken {
    /// Parses `fbjoin1:<ca>:<token>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let mut parts = s.splitn(3, ':');
        let bad = || {
            format!(
                "not a join token (expected {JOIN_PREFIX}:<hex SHA-256 of the CA certificate>:<token>, \
                 as `fleetbench-coordinator init` prints it)"
            )
        };
        let (Some(JOIN_PREFIX), Some(ca), Some(token)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if !(ca.is_empty() || (ca.len() == 64 && ca.bytes().all(|b| b.is_ascii_hexdigit()))) {
            return Err(format!(
                "join token: the CA hash must be 64 hex digits (or empty for a coordinator without \
                 TLS), got {} characters",
                ca.len()
            ));
        }
        let token = Token::parse(token).map_err(|e| format!("join token: {e}"))?;
        Ok(Self {
            ca_sha256: ca.to_ascii_lowercase(),
            token,
        })
    }

    /// The join token as an agent's operator uses it.
    pub fn to_secret_string(&self) -> Secret {
        Secret::new(format!(
            "{JOIN_PREFIX}:{}:{}",
            self.ca_sha256,
            self.token.to_secret_string().expose()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_named_without_echoing_the_secret() {
        let t = Token::mint();
        let s = t.to_secret_string();
        assert_eq!(Token::parse(s.expose()).unwrap(), t);
        assert_ne!(t.rotated().secret, t.secret);
        assert_eq!(t.rotated().id, t.id);
        assert_eq!(format!("{:?}", t.secret), "<redacted>");
        assert!(!format!("{t:?}").contains(t.secret.expose()));
        let wrong = format!("fbt1.{}.{}", t.id, "zz");
        let e = Token::parse(&wrong).unwrap_err();
        assert!(e.contains("not a fleetbench token"), "{e}");
        assert!(!e.contains("zz"));
        let j = JoinToken {
            ca_sha256: "ab".repeat(32),
            token: t.clone(),
        };
        assert_eq!(JoinToken::parse(j.to_secret_string().expose()).unwrap(), j);
        let plain = format!("fbjoin1::{}", s.expose());
        assert_eq!(JoinToken::parse(&plain).unwrap().ca_sha256, "");
        assert!(
            JoinToken::parse(&format!("fbjoin1:abc:{}", s.expose()))
                .unwrap_err()
                .contains("64 hex")
        );
        assert!(
            JoinToken::parse(s.expose())
                .unwrap_err()
                .contains("not a join token")
        );
        assert_eq!(hash_secret("x").len(), 64);
    }
}
