//! The PostgreSQL backend: blobs as rows of one table, through tokio-postgres.
//!
//! URL: `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE?table=NAME&connections=N`
//! (default table `tessera_stash`, 4 connections; other query parameters go to
//! tokio-postgres). The table is created if missing:
//! `(key TEXT PRIMARY KEY, value BYTEA NOT NULL, modified TIMESTAMPTZ)`.
//! Connections are unencrypted (`NoTls`): use a loopback server or an SSH/VPN tunnel. A
//! store opens `connections` of them (default 4, at most 64), taken in turn, so that chunks
//! move that many at a time (the server runs one statement at a time per connection); each
//! node of a cluster that opens the stash opens as many, so lower it for many nodes
//! against a server's `max_connections`.
//!
//! Why tokio-postgres and not opendal's `postgresql` service: opendal 0.59's service
//! neither lists keys (the stash lists records and chunks) nor creates its table.
//!
//! # Durability
//! Each `put` is one autocommitted upsert, durable when it returns (with PostgreSQL's
//! default `synchronous_commit = on`), so `sync` does nothing.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use tokio_postgres::{Client, NoTls};

use super::blob::{BlobStore, ObjectMeta};
use super::remote::{split_query, Blocking};
use super::StoreError;

/// How many connections a store opens unless its URL says (`connections=N`): chunks move
/// on as many threads at once, and the server runs one statement at a time per connection.
const DEFAULT_CONNECTIONS: usize = 4;
/// The most connections a URL may ask for.
const MAX_CONNECTIONS: usize = 64;

/// Blobs in a PostgreSQL table.
#[derive(Debug)]
pub(crate) struct PostgresStore {
    /// One per thread that moves chunks at once, taken in turn.
    clients: Vec<Client>,
    next_client: AtomicUsize,
    table: String,
    location: String,
    blocking: Blocking,
}

fn backend_error(op: &'static str, key: &str, e: tokio_postgres::Error) -> StoreError {
    // The Display of a server error is only "db error"; the source carries the message.
    let message = match std::error::Error::source(&e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    };
    StoreError::Backend { backend: "postgres", op, key: key.to_string(), message }
}

impl PostgresStore {
    /// Connects to the table the URL names; `create_table`: make it if it is missing,
    /// else a missing table is [`StoreError::NoStash`] (a read must not leave a table
    /// behind for a mistyped name).
    pub(crate) fn open(url: &str, create_table: bool) -> Result<PostgresStore, StoreError> {
        let invalid = |reason: String| StoreError::invalid_url(url, reason);
        let (base, query) = split_query(url)?;
        let mut table = "tessera_stash".to_string();
        let mut connections = DEFAULT_CONNECTIONS;
        let mut passthrough = Vec::new();
        for (k, v) in query {
            if k == "table" {
                table = v;
            } else if k == "connections" {
                connections =
                    v.parse().ok().filter(|n| (1..=MAX_CONNECTIONS).contains(n)).ok_or_else(|| {
                        invalid(format!("connections=`{v}` must be 1 to {MAX_CONNECTIONS}"))
                    })?;
            } else {
                passthrough.push(format!("{k}={v}"));
            }
        }
        if table.is_empty() || !table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid(format!("table name `{table}` must be [A-Za-z0-9_]+")));
        }
        let conn_url = if passthrough.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", passthrough.join("&"))
        };
        let config: tokio_postgres::Config =
            conn_url.parse().map_err(|e: tokio_postgres::Error| invalid(e.to_string()))?;
        let blocking = Blocking::new("postgres")?;
        let handle = blocking.handle().clone();
        let clients = blocking.block_on(async {
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                let (client, connection) =
                    config.connect(NoTls).await.map_err(|e| backend_error("connect", "", e))?;
                handle.spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!("postgres stash connection ended: {e}");
                    }
                });
                clients.push(client);
            }
            if !create_table {
                let found = clients[0]
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("\"{table}\"")])
                    .await
                    .map_err(|e| backend_error("find table", &table, e))?;
                if !found.get::<_, bool>(0) {
                    return Err(StoreError::NoStash { path: super::redact_url(url) });
                }
            }
            clients[0]
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS \"{table}\" (key TEXT PRIMARY KEY, value BYTEA NOT NULL, \
                     modified TIMESTAMPTZ NOT NULL DEFAULT now())"
                ))
                .await
                .map_err(|e| backend_error("create table", &table, e))?;
            Ok::<_, StoreError>(clients)
        })?;
        let location = format!("{}#{table}", super::redact_url(base));
        Ok(PostgresStore { clients, next_client: AtomicUsize::new(0), table, location, blocking })
    }

    /// The next connection in turn.
    fn client(&self) -> &Client {
        &self.clients[self.next_client.fetch_add(1, Ordering::Relaxed) % self.clients.len()]
    }
}

impl BlobStore for PostgresStore {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO \"{}\" (key, value, modified) VALUES ($1, $2, now()) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, modified = now()",
            self.table
        );
        self.blocking
            .block_on(self.client().execute(&sql, &[&key, &bytes]))
            .map(|_| ())
            .map_err(|e| backend_error("put", key, e))
    }

    fn replace(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        // One statement: a concurrent DELETE either comes first (no row to update) or
        // waits for it and deletes the new value.
        let sql = format!("UPDATE \"{}\" SET value = $2, modified = now() WHERE key = $1", self.table);
        self.blocking
            .block_on(self.client().execute(&sql, &[&key, &bytes]))
            .map(|rows| rows > 0)
            .map_err(|e| backend_error("put", key, e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT value FROM \"{}\" WHERE key = $1", self.table);
        let row = self
            .blocking
            .block_on(self.client().query_opt(&sql, &[&key]))
            .map_err(|e| backend_error("get", key, e))?;
        Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
    }

    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
        let sql = format!("SELECT octet_length(value)::BIGINT FROM \"{}\" WHERE key = $1", self.table);
        let row = self
            .blocking
            .block_on(self.client().query_opt(&sql, &[&key]))
            .map_err(|e| backend_error("stat", key, e))?;
        Ok(row.is_some_and(|r| r.get::<_, i64>(0) as u64 == len))
    }

    fn touch(&self, key: &str) -> Result<bool, StoreError> {
        // One row-locking statement: it and gc's conditional DELETE run one after the
        // other, so either this finds the row (and the DELETE then sees the new time) or
        // it finds none.
        let sql = format!("UPDATE \"{}\" SET modified = now() WHERE key = $1", self.table);
        self.blocking
            .block_on(self.client().execute(&sql, &[&key]))
            .map(|rows| rows > 0)
            .map_err(|e| backend_error("touch", key, e))
    }

    fn delete_if_untouched(&self, key: &str, since: SystemTime) -> Result<bool, StoreError> {
        let sql = format!("DELETE FROM \"{}\" WHERE key = $1 AND modified <= $2", self.table);
        self.blocking
            .block_on(self.client().execute(&sql, &[&key, &since]))
            .map(|rows| rows > 0)
            .map_err(|e| backend_error("delete", key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let sql = format!(
            "SELECT key, octet_length(value)::BIGINT, modified FROM \"{}\" WHERE starts_with(key, $1) ORDER BY key",
            self.table
        );
        let rows = self
            .blocking
            .block_on(self.client().query(&sql, &[&prefix]))
            .map_err(|e| backend_error("list", prefix, e))?;
        Ok(rows
            .iter()
            .map(|r| ObjectMeta::new(r.get(0), r.get::<_, i64>(1) as u64, Some(r.get::<_, SystemTime>(2))))
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let sql = format!("DELETE FROM \"{}\" WHERE key = $1", self.table);
        self.blocking
            .block_on(self.client().execute(&sql, &[&key]))
            .map(|_| ())
            .map_err(|e| backend_error("delete", key, e))
    }

    fn parallelism(&self) -> usize {
        self.clients.len()
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}
