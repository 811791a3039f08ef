//! How a failed database write is treated: retried, blamed on a row, or fatal.

use tokio_postgres::error::SqlState;

use crate::consumer::WriteError;

/// Why one statement (or its connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// No connection could be had (server down, pool timeout).
    #[error("no connection: {0}")]
    Pool(String),
    /// The statement failed.
    #[error("{}", db_reason(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// What to do about a failed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The connection or server state: retry the batch later.
    Transient,
    /// The data of a row: that row can never be written.
    Row,
    /// Anything else (missing table, permissions): stop.
    Fatal,
}

impl InsertError {
    /// How to treat this failure.
    pub fn verdict(&self) -> Verdict {
        match self {
            Self::Pool(_) => Verdict::Transient,
            Self::Db(e) => verdict_of(e.code()),
        }
    }

    /// As the sink loop's error, unless it is a row's fault.
    pub fn into_write_error(self) -> Result<Verdict, WriteError> {
        match self.verdict() {
            Verdict::Transient => Err(WriteError::Transient(self.to_string())),
            Verdict::Fatal => Err(WriteError::Fatal(self.to_string())),
            Verdict::Row => Ok(Verdict::Row),
        }
    }
}

impl From<deadpool_postgres::PoolError> for InsertError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Self::Db(e),
            other => Self::Pool(other.to_string()),
        }
    }
}

/// The verdict for a server error code (`None`: no answer, e.g. a lost connection).
pub fn verdict_of(code: Option<&SqlState>) -> Verdict {
    let Some(code) = code else {
        return Verdict::Transient;
    };
    match &code.code()[..2] {
        // Data exceptions and integrity violations: the row's content.
        "22" | "23" => Verdict::Row,
        // Connection, resources, operator intervention, system errors, and transaction
        // rollbacks (serialization failures, deadlocks).
        "08" | "53" | "57" | "58" | "40" => Verdict::Transient,
        _ if *code == SqlState::LOCK_NOT_AVAILABLE => Verdict::Transient,
        _ => Verdict::Fatal,
    }
}

/// The server's message and code, or the client's error.
pub fn db_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(verdict_of(None), Verdict::Transient);
        for (code, verdict) in [
            (SqlState::CHARACTER_NOT_IN_REPERTOIRE, Verdict::Row),
            (SqlState::NOT_NULL_VIOLATION, Verdict::Row),
            (SqlState::CONNECTION_FAILURE, Verdict::Transient),
            (SqlState::T_R_DEADLOCK_DETECTED, Verdict::Transient),
            (SqlState::ADMIN_SHUTDOWN, Verdict::Transient),
            (SqlState::LOCK_NOT_AVAILABLE, Verdict::Transient),
            (SqlState::UNDEFINED_TABLE, Verdict::Fatal),
            (SqlState::INSUFFICIENT_PRIVILEGE, Verdict::Fatal),
        ] {
            assert_eq!(verdict_of(Some(&code)), verdict, "{}", code.code());
        }
    }
}
