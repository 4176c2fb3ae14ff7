//! `StoreError`: every way a stash operation can fail, with the entry it concerns.
use super::Version;

/// Why a stash operation failed.
///
/// Variants name the entry (name and version), the chunk or the backend key involved,
/// so that damage can be traced to a file or an object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem operation of the embedded store failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was being done (`"write"`, `"fsync"`, `"rename"`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A remote backend (S3, PostgreSQL) reported an error.
    #[error("{backend} {op} `{key}`: {message}")]
    Backend {
        /// The backend, e.g. `"s3"` or `"postgres"`.
        backend: &'static str,
        /// What was being done.
        op: &'static str,
        /// The key involved (empty when the operation concerns no key).
        key: String,
        /// The backend's error, as text (its error types are not part of this API).
        message: String,
    },
    /// No version of this name exists (or not the requested one).
    #[error("no entry `{name}`{}", version.map(|v| format!(" at version {v}")).unwrap_or_default())]
    NotFound {
        /// The entry's name.
        name: String,
        /// The requested version, if one was requested.
        version: Option<Version>,
    },
    /// No version of this name carries the tag.
    #[error("no version of `{name}` is tagged {key}={value}")]
    TagNotFound {
        /// The entry's name.
        name: String,
        /// The tag key.
        key: String,
        /// The tag value.
        value: String,
    },
    /// The stored value has another type than the one requested.
    #[error("`{name}` version {version} holds a `{stored}`, not a `{requested}`")]
    TypeMismatch {
        /// The entry's name.
        name: String,
        /// The version that was read.
        version: Version,
        /// The type the entry was saved as.
        stored: String,
        /// The type the caller asked for.
        requested: String,
    },
    /// A chunk's bytes do not match its BLAKE3 hash: the data was damaged at rest.
    #[error("checksum mismatch in `{name}` version {version}: chunk {chunk} hashes to {actual}")]
    Checksum {
        /// The entry's name.
        name: String,
        /// The version being read.
        version: Version,
        /// The chunk's id (its expected BLAKE3 hash, hex).
        chunk: String,
        /// The BLAKE3 hash of the bytes found (hex).
        actual: String,
    },
    /// A chunk has the wrong length (truncated or extended file).
    #[error("chunk {chunk} of `{name}` version {version} is {actual} bytes, expected {expected}")]
    ChunkLength {
        /// The entry's name.
        name: String,
        /// The version being read.
        version: Version,
        /// The chunk's id (hex).
        chunk: String,
        /// The length recorded in the version.
        expected: u64,
        /// The length found.
        actual: u64,
    },
    /// A chunk referenced by a version is missing from the blob store.
    #[error("chunk {chunk} of `{name}` version {version} is missing")]
    MissingChunk {
        /// The entry's name.
        name: String,
        /// The version being read.
        version: Version,
        /// The chunk's id (hex).
        chunk: String,
    },
    /// A version record (the authoritative index entry) is truncated or garbled.
    #[error("version record `{key}` is corrupt: {reason}")]
    CorruptRecord {
        /// The record's key in the blob store.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The embedded store's sled index cannot be opened or holds garbled data.
    #[error("stash index `{path}` is corrupt: {reason} (the index is a cache: delete the directory to rebuild it)")]
    IndexCorrupt {
        /// The index directory.
        path: String,
        /// What sled or the decoder reported.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode `{name}` as `{type_name}`: {message}")]
    Encode {
        /// The entry's name.
        name: String,
        /// The Rust type being saved.
        type_name: String,
        /// The encoder's message.
        message: String,
    },
    /// Stored bytes (checksums fine) could not be decoded as the requested type.
    #[error("cannot decode `{name}` version {version} as `{type_name}`: {message}")]
    Decode {
        /// The entry's name.
        name: String,
        /// The version being read.
        version: Version,
        /// The Rust type requested.
        type_name: String,
        /// The decoder's message.
        message: String,
    },
    /// An entry name or tag is not acceptable.
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        /// What was invalid: `"name"`, `"tag key"`, `"version"`, ...
        what: &'static str,
        /// The offending text.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// An entry name does not fit this store's keys once escaped (bytes other than
    /// `A-Z a-z 0-9 _ -` take three: `%XX`).
    #[error(
        "name `{name}` is too long for {location}: escaped for its keys it takes {escaped_len} bytes, \
         at most {limit} fit (bytes other than A-Z a-z 0-9 _ - count 3)"
    )]
    NameTooLong {
        /// The name.
        name: String,
        /// The length of its escaped form.
        escaped_len: usize,
        /// The most this store holds.
        limit: usize,
        /// The store.
        location: String,
    },
    /// A store URL could not be understood.
    #[error("invalid store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given, credentials left out (each query becomes `?…`, a password
        /// in the user part is dropped).
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The URL names a backend this build does not include.
    #[error("store URL scheme `{scheme}` needs tessera built with the `{feature}` feature")]
    BackendNotCompiled {
        /// The URL scheme.
        scheme: String,
        /// The cargo feature that enables it.
        feature: &'static str,
    },
    /// The directory exists, is not empty, and is not a stash.
    #[error("`{path}` is not empty and is not a stash (no STASH marker file)")]
    NotAStash {
        /// The directory.
        path: String,
    },
    /// There is no stash at this path (the directory is missing or empty, a remote store
    /// holds no version, or no replica of a mirror holds a stash), and it was opened for
    /// reading ([`Stash::open_existing`](super::Stash::open_existing),
    /// [`Stash::open_url_existing`](super::Stash::open_url_existing)).
    #[error("no stash at `{path}` (a missing or empty directory, or a store without versions; saving into it creates one)")]
    NoStash {
        /// The directory or (redacted) URL.
        path: String,
    },
    /// A mirrored store could not reach enough of its replicas.
    #[error("{op} `{key}` succeeded on {succeeded} of {replicas} replicas, {needed} needed: {failures}")]
    Replication {
        /// What was being done.
        op: &'static str,
        /// The key (or prefix) involved.
        key: String,
        /// Replicas that succeeded.
        succeeded: usize,
        /// Replicas in all.
        replicas: usize,
        /// Replicas that had to succeed.
        needed: usize,
        /// Each failed replica's location and error.
        failures: String,
    },
    /// A blob has no intact copy on any replica of a mirrored store.
    #[error("`{key}` cannot be repaired: {reason}")]
    Unrecoverable {
        /// The blob's key.
        key: String,
        /// What each replica holds.
        reason: String,
    },
    /// An async method was called outside a tokio runtime.
    #[error("async stash methods need a tokio runtime")]
    NoRuntime,
}

impl StoreError {
    /// [`StoreError::InvalidUrl`] for `url`, redacted: error messages never carry keys or
    /// passwords.
    pub(crate) fn invalid_url(url: &str, reason: impl Into<String>) -> Self {
        StoreError::InvalidUrl { url: super::redact_url(url), reason: reason.into() }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        StoreError::Io { op, path: path.display().to_string(), source }
    }
}
