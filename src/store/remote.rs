//! Shared plumbing of the remote backends: a private tokio runtime that lets their async
//! clients serve the stash's blocking, multi-threaded calls, and URL query parsing.
use std::future::Future;

use super::StoreError;

/// A private multi-threaded tokio runtime driving one backend's client.
///
/// # Invariants
/// 1. `block_on` may be called from many threads at once (each parks on its own future).
/// 2. Called from inside another tokio runtime, `block_on` moves to a scoped plain thread,
///    since tokio refuses to block a runtime thread.
/// 3. Dropping never blocks: the runtime is shut down in the background, so a stash may
///    be dropped inside async code.
pub(crate) struct Blocking {
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Blocking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Blocking")
    }
}

impl Blocking {
    pub(crate) fn new(backend: &'static str) -> Result<Blocking, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("tessera-{backend}"))
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend {
                backend,
                op: "start runtime",
                key: String::new(),
                message: e.to_string(),
            })?;
        Ok(Blocking { runtime: Some(runtime) })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("runtime lives until drop").handle()
    }

    pub(crate) fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let runtime = self.runtime.as_ref().expect("runtime lives until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| runtime.block_on(future))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            runtime.block_on(future)
        }
    }
}

impl Drop for Blocking {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Decoded `key=value` pairs of a URL query, in order.
pub(crate) type QueryPairs = Vec<(String, String)>;

/// Splits `?a=b&c=d` off a URL: returns the URL without the query and the pairs
/// (percent-decoded).
pub(crate) fn split_query(url: &str) -> Result<(&str, QueryPairs), StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url, Vec::new()));
    };
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            // (The text is not quoted: it may be a key.)
            percent_decode(s).ok_or_else(|| StoreError::invalid_url(url, "bad percent-escape in the query"))
        };
        pairs.push((decode(k)?, decode(v)?));
    }
    Ok((base, pairs))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}
