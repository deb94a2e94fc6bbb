//! The coordinator's error type and its mapping to gRPC status codes.

/// Everything that can go wrong inside the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or breaks a rule; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request conflicts with what is stored; nothing was changed.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (the database) cannot be reached; the message says which, without secrets.
    #[error("{0}")]
    Unavailable(String),
    /// The database could not be reached or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Database migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A limit or the space left refuses the request; nothing was changed. The message says which.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The data directory (blob files) failed; the message has the path and the cause, for the log.
    #[error("data directory: {0}")]
    Storage(String),
    /// Stored bytes could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The caller has no valid token; the message says what is wrong, never the secret.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True for trouble that can heal by itself, worth retrying: the database unreachable, busy, full
    /// or restarting, or a transaction that lost a race (serialization failure, deadlock). A bad
    /// statement, a constraint or data that does not decode never heals.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Database(e) => {
                connection_error(e)
                    || database_code(e).is_some_and(|c| {
                        matches!(c.as_str(), "40001" | "40P01")
                            || c.starts_with("53")
                            || sqlite_primary(&c).is_some_and(|p| {
                                // BUSY, LOCKED, IOERR, FULL, PROTOCOL
                                matches!(p, 5 | 6 | 10 | 13 | 15)
                            })
                    })
            }
            _ => false,
        }
    }

    /// True when the database has no space left (SQLite's FULL, Postgres' disk_full).
    pub fn is_disk_full(&self) -> bool {
        match self {
            Error::Database(e) => {
                database_code(e).is_some_and(|c| c == "53100" || sqlite_primary(&c) == Some(13))
            }
            Error::ResourceExhausted(_) => true,
            _ => false,
        }
    }

    /// An I/O error on the data directory: a full disk is [`Error::ResourceExhausted`] (the client is
    /// told), anything else [`Error::Storage`] (the log is told).
    pub fn io(what: &str, e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
            // The path stays in the log; the client learns what it can act on.
            tracing::warn!(%what, error = %e, "The data directory's disk is full.");
            Error::ResourceExhausted(
                "the coordinator's disk is full (no space left on device); nothing was stored (free \
                 space in its data directory)"
                    .into(),
            )
        } else {
            Error::Storage(format!("{what}: {e}"))
        }
    }

    /// True when the database could not be reached at all (only this counts as the store being in
    /// trouble, which holds back lease expiry).
    pub fn is_connection(&self) -> bool {
        match self {
            Error::Unavailable(_) => true,
            Error::Database(e) => connection_error(e),
            _ => false,
        }
    }
}

fn connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => database_code(e).is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_str(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

fn database_code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// SQLite reports (extended) result codes as decimal numbers; the primary code is the low byte.
fn sqlite_primary(code: &str) -> Option<i64> {
    code.parse::<i64>().ok().map(|c| c & 0xff)
}

/// Result with the coordinator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<fleetbench_common::hist::HistError> for Error {
    fn from(e: fleetbench_common::hist::HistError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<fleetbench_common::config::ConfigError> for Error {
    fn from(e: fleetbench_common::config::ConfigError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match &e {
            Error::NotFound(m) => tonic::Status::not_found(m.clone()),
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            Error::AlreadyExists(m) => tonic::Status::already_exists(m.clone()),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m.clone()),
            Error::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            Error::PermissionDenied(m) => tonic::Status::permission_denied(m.clone()),
            Error::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            Error::ResourceExhausted(m) => {
                tracing::warn!(error = %m, "A request was refused for want of space or a limit.");
                tonic::Status::resource_exhausted(m.clone())
            }
            Error::Storage(_) => {
                tracing::warn!(error = %e, "A request failed on the data directory.");
                tonic::Status::unavailable(
                    "the coordinator could not read or write its data directory; its log has the details",
                )
            }
            // The database's own words can carry internals (statements, paths, hosts): they go to the
            // log, and the client gets what it can act on.
            Error::Database(_) if e.is_disk_full() => {
                tracing::warn!(error = %e, "A request failed: the database's disk is full.");
                tonic::Status::unavailable(
                    "the coordinator's database has no space left on its disk; nothing was changed (free space on the coordinator)",
                )
            }
            Error::Database(_) | Error::Migrate(_) => {
                tracing::warn!(error = %e, "A request failed on the database.");
                tonic::Status::unavailable(
                    "the coordinator's database failed or is unreachable; the coordinator's log has the details",
                )
            }
            Error::Corrupt(_) | Error::Internal(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trouble_that_can_heal_is_retried_and_only_connections_count_as_outages() {
        let io = Error::Database(sqlx::Error::Io(std::io::Error::other("reset")));
        assert!(io.is_transient() && io.is_connection());
        let pool = Error::Database(sqlx::Error::PoolTimedOut);
        assert!(pool.is_transient() && pool.is_connection());
        let corrupt = Error::Corrupt("latency histogram is not valid".into());
        assert!(!corrupt.is_transient() && !corrupt.is_connection());
        let decode = Error::Database(sqlx::Error::ColumnNotFound("x".into()));
        assert!(!decode.is_transient());
        assert!(!Error::InvalidArgument("x".into()).is_transient());
    }

    #[test]
    fn clients_get_no_database_internals() {
        let e = Error::Database(sqlx::Error::Protocol(
            "SELECT secret FROM tasks at /var/lib/fleetbench/fleet.db".into(),
        ));
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            !status.message().contains("SELECT") && !status.message().contains("/var/lib"),
            "{status:?}"
        );
    }
}
