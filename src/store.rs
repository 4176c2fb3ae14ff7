//! The stash: versioned, typed, tagged persistent storage of named values over pluggable
//! blob stores.
//!
//! [`Stash::save`] splits a value's bytes into content-addressed chunks (BLAKE3), stores
//! the chunks a [`BlobStore`] does not hold yet, then commits a version record naming
//! them. [`Stash::load`] reads the latest version back (or one by [`Version`] or tag),
//! checking every chunk's hash. ndarray arrays use a compact layout (header, then raw
//! little-endian elements); other values use bincode.
//!
//! # Backends
//! - [`Stash::open`]: the embedded store, a directory of chunk and record files written
//!   by temporary file, fsync, rename, with a sled index caching records.
//! - [`Stash::open_url`] with `s3://` (feature `s3`, through opendal) or `postgres://`
//!   (feature `postgres`, through tokio-postgres).
//! - [`Stash::mirrored`] or `mirror:URL,URL` URLs: a copy on each of several stores, read
//!   from the first intact copy and brought back whole by [`Stash::repair`].
//!
//! `open` and `open_url` make a missing or empty directory a new stash (saving needs
//! nothing more); [`Stash::open_existing`] and [`Stash::open_url_existing`] refuse it
//! with [`StoreError::NoStash`], for reading and maintenance at a path that may be
//! mistyped.
//!
//! # Guarantees
//! A version is listed only after all its chunks are durable; a process killed mid-save
//! leaves earlier versions intact and lists no partial one. Concurrent saves (threads or
//! processes) of one name all land as distinct versions. Damage is reported as an error
//! naming the entry, never hidden. `SAFETY.md` lists the hazards and recovery steps.
//!
//! # Examples
//! ```
//! let dir = std::env::temp_dir().join(format!("tessera-doc-{}", std::process::id()));
//! let stash = tessera::Stash::open(&dir)?;
//! let v1 = stash.save("greeting", &"hello".to_string(), &[("lang", "en")])?;
//! stash.save("greeting", &"bonjour".to_string(), &[("lang", "fr")])?;
//! assert_eq!(stash.load::<String>("greeting")?, "bonjour");
//! assert_eq!(stash.load_version::<String>("greeting", v1)?, "hello");
//! assert_eq!(stash.load_tagged::<String>("greeting", "lang", "en")?, "hello");
//! # std::fs::remove_dir_all(&dir).ok();
//! Ok::<(), tessera::StoreError>(())
//! ```
mod array;
mod blob;
mod error;
mod index;
mod local;
mod mirror;
#[cfg(feature = "postgres")]
mod postgres;
mod record;
#[cfg(any(feature = "s3", feature = "postgres"))]
mod remote;
#[cfg(feature = "s3")]
mod s3;
mod stash;
mod version;

pub(crate) use array::to_little_endian;
pub use array::{ArrayElement, Dtype};
pub use blob::{BlobStore, ObjectMeta, PutBatch, RepairReport};
pub use error::StoreError;
pub use record::{Layout, VersionInfo};
pub use stash::{
    redact_url, GcReport, Stash, StoreStats, TransferKind, TransferProgress, VerifyReport, CHUNK_SIZE,
    DEFAULT_GC_GRACE,
};
pub use version::Version;
