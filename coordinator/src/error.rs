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
    /// Stored bytes could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
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
            Error::Unavailable(m) => tonic::Status::unavailable(m.clone()),
            Error::Database(_) | Error::Migrate(_) => tonic::Status::unavailable(e.to_string()),
            Error::Corrupt(_) | Error::Internal(_) => tonic::Status::internal(e.to_string()),
        }
    }
}
