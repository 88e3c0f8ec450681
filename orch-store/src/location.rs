//! Where a ledger lives, as users name it (`--db`, `ORCHD_DB`, `db =`): a SQLite file path, or
//! a PostgreSQL database as a `postgres://` URL. One place opens either.

use std::path::PathBuf;
use std::sync::Arc;

use orch_core::Clock;

use crate::{PgStore, SqliteStore, Store, StoreError, StoreOptions, Synchronous};

/// A ledger's location. Its `Display` and `Debug` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (and schema, by the URL's `options=-c search_path=…`).
    Postgres(String),
}

impl Location {
    /// Opens the ledger. With `create`, a missing ledger is created (and any ledger migrated);
    /// without, a missing one is [`StoreError::Missing`].
    pub fn open(
        &self,
        clock: Arc<dyn Clock>,
        opts: StoreOptions,
        sync: Synchronous,
        create: bool,
    ) -> Result<Arc<dyn Store>, StoreError> {
        match self {
            Location::Sqlite(path) => {
                if !create && !path.exists() {
                    return Err(StoreError::Missing { what: "ledger", id: path.display().to_string() });
                }
                Ok(Arc::new(SqliteStore::open(path, clock, opts, sync)?))
            }
            Location::Postgres(url) => Ok(Arc::new(PgStore::open_with(url, clock, opts, sync, create)?)),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<postgres::Config>().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
            Ok(Location::Postgres(s.to_string()))
        } else if s.is_empty() {
            Err("a ledger location must not be empty".into())
        } else {
            Ok(Location::Sqlite(PathBuf::from(s)))
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => match url.parse::<postgres::Config>() {
                Ok(c) => f.write_str(&crate::pg::display_url(&c)),
                Err(_) => f.write_str("postgres://…"),
            },
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Location::Sqlite(p) => s.serialize_str(&p.to_string_lossy()),
            Location::Postgres(url) => s.serialize_str(url),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Location {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_postgres_and_the_rest_are_files() {
        let pg: Location = "postgres://orch:s3cret@db.example:5433/ledger".parse().unwrap();
        assert!(matches!(pg, Location::Postgres(_)));
        assert_eq!(pg.to_string(), "postgres://orch@db.example:5433/ledger");
        assert!(!format!("{pg:?}").contains("s3cret"), "the password never shows");
        assert_eq!("orchd.db".parse::<Location>().unwrap(), Location::Sqlite("orchd.db".into()));
        assert!("postgres://host:notaport/db".parse::<Location>().is_err());
        assert!("".parse::<Location>().is_err());
    }
}
