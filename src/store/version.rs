//! `Version`: a stash version id, ordered by creation time and unique across processes.
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// A version id: nanoseconds since the Unix epoch, then a random nonce.
///
/// Ordering is by time first, so the greatest version of a name is its latest. Within one
/// process ids strictly increase; across processes the 32-bit random nonce makes two ids
/// created in the same nanosecond distinct. The text form is 24 lowercase hex digits
/// (16 for the time, 8 for the nonce), which sorts the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    time_ns: u64,
    nonce: u32,
}

static LAST_TIME_NS: AtomicU64 = AtomicU64::new(0);

impl Version {
    /// A fresh version id for the current time.
    pub(crate) fn now() -> Version {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        // Strictly increasing within the process, even if the clock stalls or steps back.
        let mut last = LAST_TIME_NS.load(Ordering::Relaxed);
        let time_ns = loop {
            let next = now.max(last + 1);
            match LAST_TIME_NS.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(seen) => last = seen,
            }
        };
        Version { time_ns, nonce: random_u32(time_ns) }
    }

    /// When the version was created.
    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.time_ns)
    }
}

/// 32 random bits from the std hasher's per-process random keys, the pid and the time.
fn random_u32(time_ns: u64) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(time_ns);
    h.write_u32(std::process::id());
    let x = h.finish();
    (x ^ (x >> 32)) as u32
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:08x}", self.time_ns, self.nonce)
    }
}

impl FromStr for Version {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| StoreError::Invalid { what: "version", value: s.to_string(), reason };
        if s.len() != 24 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("expected 24 hex digits"));
        }
        let time_ns = u64::from_str_radix(&s[..16], 16).map_err(|_| bad("bad time part"))?;
        let nonce = u32::from_str_radix(&s[16..], 16).map_err(|_| bad("bad nonce part"))?;
        Ok(Version { time_ns, nonce })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_round_trip() {
        let a = Version::now();
        let b = Version::now();
        assert!(b > a);
        assert!(b.to_string() > a.to_string());
        assert_eq!(a.to_string().parse::<Version>().unwrap(), a);
        assert!("xyz".parse::<Version>().is_err());
    }
}
