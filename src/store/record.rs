//! Version records: the durable, self-checking description of one saved version, and the
//! public `VersionInfo` view of it.
//!
//! # Format
//! A record blob is `b"TSREC"`, a format byte (1), the 32-byte BLAKE3 hash of the body,
//! then the body: the [`Record`] in bincode (standard config). Any truncation or changed
//! byte fails the hash check and is reported as [`StoreError::CorruptRecord`].
use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::array::Dtype;
use super::{StoreError, Version};

const MAGIC: &[u8; 5] = b"TSREC";
const FORMAT: u8 = 1;
const HEADER_LEN: usize = MAGIC.len() + 1 + 32;

/// How a version's bytes encode its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Layout {
    /// A serde value encoded with bincode 2 (standard configuration).
    Bincode,
    /// An n-dimensional array: a header (magic, dtype, shape), then the elements in
    /// row-major order as raw little-endian bytes.
    Array {
        /// The element type.
        dtype: Dtype,
        /// The array's shape.
        shape: Vec<u64>,
        /// Bytes of header before the first element.
        header_len: u32,
    },
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Bincode => f.write_str("bincode"),
            Layout::Array { dtype, shape, .. } => write!(f, "array {dtype} {shape:?}"),
        }
    }
}

/// One content-addressed chunk of a version's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkRef {
    pub(crate) hash: [u8; 32],
    pub(crate) len: u32,
}

impl ChunkRef {
    pub(crate) fn key(&self) -> String {
        chunk_key(&self.hash)
    }

    pub(crate) fn hex(&self) -> String {
        hex(&self.hash)
    }
}

pub(crate) fn chunk_key(hash: &[u8; 32]) -> String {
    format!("chunks/{}", hex(hash))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Everything stored about one version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) name: String,
    pub(crate) version: Version,
    pub(crate) type_name: String,
    pub(crate) fingerprint: [u8; 16],
    pub(crate) size: u64,
    pub(crate) checksum: [u8; 32],
    pub(crate) tags: BTreeMap<String, String>,
    pub(crate) layout: Layout,
    pub(crate) chunks: Vec<ChunkRef>,
}

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let body = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .expect("a record always encodes");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
        let corrupt = |reason: String| StoreError::CorruptRecord { key: key.to_string(), reason };
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!("truncated: {} bytes, header needs {HEADER_LEN}", bytes.len())));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("bad magic (not a stash record)".into()));
        }
        if bytes[MAGIC.len()] != FORMAT {
            return Err(corrupt(format!("unknown record format {}", bytes[MAGIC.len()])));
        }
        let body = &bytes[HEADER_LEN..];
        if blake3::hash(body).as_bytes() != &bytes[MAGIC.len() + 1..HEADER_LEN] {
            return Err(corrupt("checksum mismatch (truncated or garbled)".into()));
        }
        let (record, used): (Record, usize) =
            crate::codec::decode_slice(body).map_err(|e| corrupt(format!("undecodable body: {e}")))?;
        if used != body.len() {
            return Err(corrupt("trailing bytes after the body".into()));
        }
        Ok(record)
    }

    /// [`decode`](Record::decode), then checks that the record belongs under `key`: a
    /// record copied under another name's or version's key (a backup restored to the
    /// wrong place) is corrupt, not a second copy of that version.
    pub(crate) fn decode_at(key: &str, bytes: &[u8]) -> Result<Record, StoreError> {
        let record = Record::decode(key, bytes)?;
        record.check_key(key)?;
        Ok(record)
    }

    /// Whether this record's name and version are those its key says.
    pub(crate) fn check_key(&self, key: &str) -> Result<(), StoreError> {
        let own = record_key(&self.name, self.version);
        if own == key {
            return Ok(());
        }
        Err(StoreError::CorruptRecord {
            key: key.to_string(),
            reason: format!(
                "it holds `{}` version {}, whose record belongs at `{own}`",
                self.name, self.version
            ),
        })
    }

    /// The version checksum: BLAKE3 over the size and every chunk's BLAKE3 hash in order.
    pub(crate) fn checksum_of(size: u64, chunks: &[ChunkRef]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&size.to_le_bytes());
        for chunk in chunks {
            hasher.update(&chunk.hash);
            hasher.update(&chunk.len.to_le_bytes());
        }
        *hasher.finalize().as_bytes()
    }

    pub(crate) fn info(&self) -> VersionInfo {
        VersionInfo {
            name: self.name.clone(),
            version: self.version,
            type_name: self.type_name.clone(),
            fingerprint: hex(&self.fingerprint),
            created: self.version.time(),
            size: self.size,
            checksum: hex(&self.checksum),
            tags: self.tags.clone(),
            layout: self.layout.clone(),
            chunks: self.chunks.len(),
        }
    }
}

/// What the stash knows about one saved version.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VersionInfo {
    /// The entry's name.
    pub name: String,
    /// The version id.
    pub version: Version,
    /// The type the value was saved as (`std::any::type_name`, or `ndarray<dtype>` for arrays).
    pub type_name: String,
    /// Hex fingerprint of the type name and layout (see the module docs).
    pub fingerprint: String,
    /// When the version was created.
    pub created: SystemTime,
    /// The value's encoded size in bytes.
    pub size: u64,
    /// Hex BLAKE3 checksum over the size and the chunk hashes (the content's Merkle root).
    pub checksum: String,
    /// User tags.
    pub tags: BTreeMap<String, String>,
    /// How the bytes encode the value.
    pub layout: Layout,
    /// How many chunks hold the bytes.
    pub chunks: usize,
}

/// Escapes an entry name into one key segment: `[A-Za-z0-9_-]` stay, every other byte
/// (`.` and `/` included, so no segment is `.` or `..`) becomes `%XX`.
pub(crate) fn escape_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Inverse of [`escape_name`]; `None` for text that escape_name cannot produce.
pub(crate) fn unescape_name(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn record_prefix(name: &str) -> String {
    format!("records/{}/", escape_name(name))
}

pub(crate) fn record_key(name: &str, version: Version) -> String {
    format!("{}{version}", record_prefix(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            name: "a/b c".into(),
            version: Version::now(),
            type_name: "u32".into(),
            fingerprint: [1; 16],
            size: 4,
            checksum: [2; 32],
            tags: BTreeMap::from([("k".to_string(), "v".to_string())]),
            layout: Layout::Bincode,
            chunks: vec![ChunkRef { hash: [3; 32], len: 4 }],
        }
    }

    #[test]
    fn record_round_trips_and_detects_damage() {
        let rec = sample();
        let bytes = rec.encode();
        let back = Record::decode("k", &bytes).unwrap();
        assert_eq!(back.name, rec.name);
        assert_eq!(back.chunks, rec.chunks);
        for cut in [0, 3, HEADER_LEN, bytes.len() - 1] {
            assert!(matches!(Record::decode("k", &bytes[..cut]), Err(StoreError::CorruptRecord { .. })));
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(matches!(Record::decode("k", &bad), Err(StoreError::CorruptRecord { .. })), "byte {i}");
        }
    }

    #[test]
    fn names_escape_reversibly() {
        for name in ["plain", "a/b", "we ird%/ü", "..", "."] {
            let esc = escape_name(name);
            assert!(!esc.contains('/'));
            assert_ne!(esc, "..");
            assert_eq!(unescape_name(&esc).as_deref(), Some(name));
        }
    }
}
