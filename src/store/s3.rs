//! The S3 backend: blobs as objects under `s3://bucket/prefix`, through opendal.
//!
//! URL: `s3://BUCKET/PREFIX?endpoint=URL&region=R&access_key_id=K&secret_access_key=S`.
//! Missing credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a missing
//! region from `AWS_REGION` (else `us-east-1`). Requests use path-style addressing, which
//! S3-compatible servers (MinIO, s3s-fs, moto) expect. The bucket must exist.
//!
//! # Durability
//! A PUT is atomic and durable when it returns (S3's contract), so `sync` does nothing.
//! S3 cannot touch an object cheaply: a chunk reused by a save keeps its old
//! modification time, which weakens gc's grace period (see SAFETY.md).
use std::time::SystemTime;

use std::future::IntoFuture;

use opendal::{ErrorKind, Operator};

use super::blob::{BlobStore, ObjectMeta};
use super::remote::{split_query, Blocking};
use super::StoreError;

/// Blobs in an S3 bucket.
#[derive(Debug)]
pub(crate) struct S3Store {
    operator: Operator,
    location: String,
    blocking: Blocking,
}

fn backend_error(op: &'static str, key: &str, e: opendal::Error) -> StoreError {
    StoreError::Backend { backend: "s3", op, key: key.to_string(), message: e.to_string() }
}

impl S3Store {
    pub(crate) fn open(url: &str) -> Result<S3Store, StoreError> {
        let invalid = |reason: String| StoreError::invalid_url(url, reason);
        let (base, query) = split_query(url)?;
        let rest = base.strip_prefix("s3://").ok_or_else(|| invalid("expected s3://".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("no bucket".into()));
        }
        let mut builder = opendal::services::S3::default().bucket(bucket).root(&format!("/{prefix}"));
        let mut region = std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".to_string());
        let mut key_id = std::env::var("AWS_ACCESS_KEY_ID").ok();
        let mut secret = std::env::var("AWS_SECRET_ACCESS_KEY").ok();
        for (k, v) in query {
            match k.as_str() {
                "endpoint" => builder = builder.endpoint(&v),
                "region" => region = v,
                "access_key_id" => key_id = Some(v),
                "secret_access_key" => secret = Some(v),
                other => return Err(invalid(format!("unknown parameter `{other}`"))),
            }
        }
        builder = builder.region(&region).disable_config_load().disable_ec2_metadata();
        if let Some(k) = key_id {
            builder = builder.access_key_id(&k);
        }
        if let Some(s) = secret {
            builder = builder.secret_access_key(&s);
        }
        opendal::install_default();
        let blocking = Blocking::new("s3")?;
        let operator = {
            let _guard = blocking.handle().enter();
            Operator::new(builder).map_err(|e| backend_error("configure", "", e))?
        };
        let location = format!("s3://{bucket}/{prefix}");
        Ok(S3Store { operator, location, blocking })
    }
}

impl BlobStore for S3Store {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let data = bytes.to_vec();
        self.blocking
            .block_on(self.operator.write(key, data))
            .map(|_| ())
            .map_err(|e| backend_error("put", key, e))
    }

    fn replace(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        // A conditional PUT (If-Match on the ETag just read): it fails if the object was
        // deleted (or rewritten) since. Servers that ignore If-Match leave a window in
        // which a concurrent delete is undone (SAFETY.md, "Tag races").
        let etag = match self.blocking.block_on(self.operator.stat(key)) {
            Ok(meta) => meta.etag().map(str::to_string),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(backend_error("stat", key, e)),
        };
        let Some(etag) = etag else {
            self.put(key, bytes)?;
            return Ok(true);
        };
        let write = self.operator.write_with(key, bytes.to_vec()).if_match(&etag).into_future();
        match self.blocking.block_on(write) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::ConditionNotMatch | ErrorKind::NotFound) => Ok(false),
            Err(e) => Err(backend_error("put", key, e)),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.blocking.block_on(self.operator.read(key)) {
            Ok(buffer) => Ok(Some(buffer.to_vec())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend_error("get", key, e)),
        }
    }

    fn has(&self, key: &str, len: u64) -> Result<bool, StoreError> {
        match self.blocking.block_on(self.operator.stat(key)) {
            Ok(meta) => Ok(meta.content_length() == len),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(backend_error("stat", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let entries =
            match self.blocking.block_on(self.operator.list_with(prefix).recursive(true).into_future()) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(backend_error("list", prefix, e)),
            };
        Ok(entries
            .into_iter()
            .filter(|e| !e.metadata().is_dir())
            .map(|e| {
                let modified = e.metadata().last_modified().map(SystemTime::from);
                ObjectMeta::new(e.path().to_string(), e.metadata().content_length(), modified)
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.blocking.block_on(self.operator.delete(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend_error("delete", key, e)),
        }
    }

    fn key_segment_limit(&self) -> Option<usize> {
        // S3 keys are at most 1024 bytes; a record key is `records/` + the segment + `/` +
        // a 24-digit version (the prefix under the bucket counts too).
        let prefix = self.location.splitn(4, '/').nth(3).filter(|p| !p.is_empty()).map_or(0, |p| p.len() + 1);
        Some(1024usize.saturating_sub("records/".len() + 1 + 24 + prefix))
    }

    fn parallelism(&self) -> usize {
        8
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}
