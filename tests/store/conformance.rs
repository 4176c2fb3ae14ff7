//! One conformance suite, run unchanged against every backend.
use std::time::Duration;

use ndarray::{Array2, ArrayD, IxDyn};
use serde::{Deserialize, Serialize};
use tessera::{Layout, Stash, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Config {
    name: String,
    layers: Vec<u32>,
    rate: f64,
}

/// Runs every check against `stash`, which must be empty.
pub(crate) fn run(stash: &Stash) {
    round_trip_and_info(stash);
    versions_tags_and_history(stash);
    wrong_type_names_the_stored_type(stash);
    arrays(stash);
    multi_chunk_and_dedup(stash);
    list_and_names(stash);
    concurrent_saves_all_land(stash);
    delete_and_gc(stash);
    async_variants(stash);
    let report = stash.verify().unwrap();
    assert!(report.problems.is_empty(), "verify found {:?}", report.problems);
    assert!(report.versions > 0 && report.chunks > 0);
}

fn config(n: u32) -> Config {
    Config { name: format!("net-{n}"), layers: vec![n, 2 * n, 3], rate: 0.5 / f64::from(n + 1) }
}

fn round_trip_and_info(stash: &Stash) {
    let v = stash.save("cfg", &config(1), &[("stage", "dev")]).unwrap();
    assert_eq!(stash.load::<Config>("cfg").unwrap(), config(1));
    let info = stash.info("cfg", None).unwrap();
    assert_eq!(info.version, v);
    assert_eq!(info.name, "cfg");
    assert!(info.type_name.ends_with("Config"), "{}", info.type_name);
    assert_eq!(info.layout, Layout::Bincode);
    assert_eq!(info.tags.get("stage").map(String::as_str), Some("dev"));
    assert_eq!(info.checksum.len(), 64);
    assert_eq!(info.fingerprint.len(), 32);
    assert!(info.size > 0);
    // Small and odd values.
    stash.save("unit", &(), &[]).unwrap();
    stash.load::<()>("unit").unwrap();
    stash.save("empty", &Vec::<u8>::new(), &[]).unwrap();
    assert!(stash.load::<Vec<u8>>("empty").unwrap().is_empty());
    stash.save("odd name/with spaces & ünïcode", &42u64, &[]).unwrap();
    assert_eq!(stash.load::<u64>("odd name/with spaces & ünïcode").unwrap(), 42);
    assert!(matches!(stash.load::<u64>("missing"), Err(StoreError::NotFound { .. })));
    assert!(matches!(stash.save("", &1u8, &[]), Err(StoreError::Invalid { .. })));
    assert!(matches!(stash.save("x", &1u8, &[("a=b", "c")]), Err(StoreError::Invalid { .. })));
}

fn versions_tags_and_history(stash: &Stash) {
    let v1 = stash.save("model", &config(1), &[("epoch", "1")]).unwrap();
    let v2 = stash.save("model", &config(2), &[("epoch", "2")]).unwrap();
    let v3 = stash.save("model", &config(3), &[]).unwrap();
    assert!(v1 < v2 && v2 < v3);
    assert_eq!(stash.load::<Config>("model").unwrap(), config(3));
    assert_eq!(stash.load_version::<Config>("model", v1).unwrap(), config(1));
    assert_eq!(stash.load_tagged::<Config>("model", "epoch", "2").unwrap(), config(2));
    assert!(matches!(
        stash.load_tagged::<Config>("model", "epoch", "9"),
        Err(StoreError::TagNotFound { .. })
    ));
    stash.tag("model", v1, "best", "yes").unwrap();
    assert_eq!(stash.load_tagged::<Config>("model", "best", "yes").unwrap(), config(1));
    let history = stash.history("model").unwrap();
    assert_eq!(history.iter().map(|i| i.version).collect::<Vec<_>>(), vec![v1, v2, v3]);
    assert_eq!(history[0].tags.get("epoch").map(String::as_str), Some("1"));
    assert_eq!(history[0].tags.get("best").map(String::as_str), Some("yes"));
    assert!(history.windows(2).all(|w| w[0].created <= w[1].created));
    assert!(matches!(stash.tag("nope", v1, "k", "v"), Err(StoreError::NotFound { .. })));
}

fn wrong_type_names_the_stored_type(stash: &Stash) {
    let err = stash.load::<Vec<String>>("model").unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StoreError::TypeMismatch { .. }), "{err:?}");
    assert!(message.contains("Config"), "message should name the stored type: {message}");
    let err = stash.load::<ArrayD<f32>>("model").unwrap_err();
    assert!(matches!(err, StoreError::TypeMismatch { .. }), "{err:?}");
}

fn arrays(stash: &Stash) {
    let a = ArrayD::from_shape_fn(IxDyn(&[3, 4, 5]), |i| (i[0] * 100 + i[1] * 10 + i[2]) as f32 * 0.5);
    stash.save("arr/f32", &a, &[]).unwrap();
    assert_eq!(stash.load::<ArrayD<f32>>("arr/f32").unwrap(), a);
    let info = stash.info("arr/f32", None).unwrap();
    assert_eq!(info.type_name, "ndarray<f32>");
    assert!(matches!(info.layout, Layout::Array { ref shape, .. } if shape == &[3, 4, 5]));
    // Compact: header (8 + 8 per dim) + 4 bytes per element, nothing else.
    assert_eq!(info.size, 8 + 3 * 8 + 60 * 4);
    let b = Array2::<f64>::from_shape_fn((7, 3), |(i, j)| (i * 3 + j) as f64);
    stash.save("arr/f64", &b, &[]).unwrap();
    assert_eq!(stash.load::<Array2<f64>>("arr/f64").unwrap(), b);
    assert_eq!(stash.load_array::<f64, IxDyn>("arr/f64").unwrap(), b.clone().into_dyn());
    // A transposed (non-contiguous) view is stored in logical order.
    stash.save_array("arr/t", &b.t(), &[]).unwrap();
    assert_eq!(stash.load::<Array2<f64>>("arr/t").unwrap(), b.t().to_owned());
    let err = stash.load::<ArrayD<f64>>("arr/f32").unwrap_err();
    assert!(err.to_string().contains("ndarray<f32>"), "{err}");
    assert!(matches!(stash.load::<Array2<f32>>("arr/f32"), Err(StoreError::TypeMismatch { .. })));
    assert!(matches!(stash.load::<Vec<f32>>("arr/f32"), Err(StoreError::TypeMismatch { .. })));
    let ints = ndarray::Array1::<i64>::from_iter(-5..5);
    stash.save("arr/i64", &ints, &[]).unwrap();
    assert_eq!(stash.load::<ndarray::Array1<i64>>("arr/i64").unwrap(), ints);
}

fn multi_chunk_and_dedup(stash: &Stash) {
    let n = (tessera::CHUNK_SIZE * 5 / 2) / 4; // 2.5 chunks of f32
    let a = ndarray::Array1::from_iter((0..n).map(|i| i as f32));
    let before = stash.stats().unwrap();
    stash.save("big", &a, &[]).unwrap();
    let mid = stash.stats().unwrap();
    assert_eq!(stash.info("big", None).unwrap().chunks, 3);
    assert_eq!(mid.chunks - before.chunks, 3);
    assert_eq!(stash.load::<ndarray::Array1<f32>>("big").unwrap(), a);
    // The same value again stores no new chunk; a serde Vec of other bytes does.
    stash.save("big", &a, &[]).unwrap();
    assert_eq!(stash.stats().unwrap().chunk_bytes, mid.chunk_bytes);
    let v: Vec<u32> = (0..(n as u32)).collect();
    stash.save("bigvec", &v, &[]).unwrap();
    assert_eq!(stash.load::<Vec<u32>>("bigvec").unwrap(), v);
}

fn list_and_names(stash: &Stash) {
    let names = stash.names("arr/").unwrap();
    assert_eq!(names, vec!["arr/f32", "arr/f64", "arr/i64", "arr/t"]);
    let listed = stash.list("").unwrap();
    let model = listed.iter().find(|i| i.name == "model").unwrap();
    assert_eq!(model.version, stash.history("model").unwrap().last().unwrap().version);
    assert!(listed.iter().any(|i| i.name == "odd name/with spaces & ünïcode"));
    assert!(stash.list("zzz").unwrap().is_empty());
}

fn concurrent_saves_all_land(stash: &Stash) {
    let versions: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u32)
            .map(|t| {
                let stash = stash.clone();
                scope.spawn(move || stash.save("race", &config(t), &[("thread", &t.to_string())]).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let history = stash.history("race").unwrap();
    assert_eq!(history.len(), 4);
    for (t, v) in versions.iter().enumerate() {
        assert_eq!(stash.load_version::<Config>("race", *v).unwrap(), config(t as u32));
    }
}

fn delete_and_gc(stash: &Stash) {
    let a = ndarray::Array1::from_iter((0..300_000).map(|i| (i as f32).sin()));
    let v1 = stash.save("doomed", &a, &[]).unwrap();
    let v2 = stash.save("doomed", &(&a * 2.0), &[]).unwrap();
    assert_eq!(stash.delete("doomed", Some(v1)).unwrap(), 1);
    assert!(matches!(
        stash.load_version::<ndarray::Array1<f32>>("doomed", v1),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(stash.load::<ndarray::Array1<f32>>("doomed").unwrap(), &a * 2.0);
    // The default grace period keeps just-written chunks.
    let kept = stash.gc().unwrap();
    assert_eq!(kept.chunks_deleted, 0);
    assert!(kept.chunks_young >= 1);
    let before = stash.stats().unwrap();
    let report = stash.gc_with_grace(Duration::ZERO).unwrap();
    assert_eq!(report.chunks_deleted, 1, "{report:?}");
    assert_eq!(stash.stats().unwrap().chunks, before.chunks - 1);
    assert_eq!(stash.load::<ndarray::Array1<f32>>("doomed").unwrap(), &a * 2.0);
    assert_eq!(stash.delete("doomed", None).unwrap(), 1);
    assert!(matches!(stash.delete("doomed", None), Err(StoreError::NotFound { .. })));
    assert!(matches!(stash.delete("doomed", Some(v2)), Err(StoreError::NotFound { .. })));
    assert_eq!(stash.gc_with_grace(Duration::ZERO).unwrap().chunks_deleted, 1);
    // Everything else survived gc.
    assert_eq!(stash.load::<Config>("model").unwrap(), config(3));
    assert_eq!(stash.load::<ndarray::Array1<f32>>("big").unwrap().len(), tessera::CHUNK_SIZE * 5 / 8);
}

fn async_variants(stash: &Stash) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let v = stash.save_async("async", config(7), &[]).await.unwrap();
        assert_eq!(stash.load_async::<Config>("async").await.unwrap(), config(7));
        assert_eq!(stash.info("async", None).unwrap().version, v);
    });
}

#[test]
fn conformance_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let stash = Stash::open(dir.path().join("stash")).unwrap();
    run(&stash);
    // Reopening sees the same content (and the index of a closed stash).
    drop(stash);
    let stash = Stash::open_url(&format!("file://{}", dir.path().join("stash").display())).unwrap();
    assert_eq!(stash.load::<Config>("model").unwrap(), config(3));
}

#[cfg(feature = "s3")]
#[test]
fn conformance_s3() {
    let server = super::servers::S3Server::start("stash-test");
    let stash = Stash::open_url(&server.url("stash-test", "conformance")).unwrap();
    run(&stash);
}

#[cfg(feature = "postgres")]
#[test]
fn conformance_postgres() {
    let server = super::servers::PgServer::start();
    let stash = Stash::open_url(&server.url("stash_conformance")).unwrap();
    run(&stash);
    // One connection (as before the store took several in turn) behaves the same.
    let stash = Stash::open_url(&format!("{}&connections=1", server.url("stash_one_connection"))).unwrap();
    run(&stash);
    for bad in ["0", "65", "many"] {
        let url = format!("{}&connections={bad}", server.url("stash_bad"));
        match Stash::open_url(&url) {
            Err(StoreError::InvalidUrl { reason, .. }) => {
                assert!(reason.contains("must be 1 to 64"), "{reason}")
            }
            other => panic!("connections={bad} gave {other:?}"),
        }
    }
}

#[test]
fn urls_are_checked() {
    assert!(matches!(Stash::open_url("ftp://x/y"), Err(StoreError::InvalidUrl { .. })));
    assert!(matches!(Stash::open_url("file://relative"), Err(StoreError::InvalidUrl { .. })));
    #[cfg(not(feature = "s3"))]
    assert!(matches!(Stash::open_url("s3://b/p"), Err(StoreError::BackendNotCompiled { .. })));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), b"not a stash").unwrap();
    assert!(matches!(Stash::open(dir.path()), Err(StoreError::NotAStash { .. })));
}

/// Names whose escaped form does not fit a file name (255 bytes) fail with a clear error
/// naming the limit, before anything is written; names that fit work, on a directory
/// stash and on a mirror of directories alike.
#[test]
fn names_too_long_for_the_directory_store_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = format!("mirror:{},{}", dir.path().join("a").display(), dir.path().join("b").display());
    for stash in [Stash::open(dir.path().join("stash")).unwrap(), Stash::open_url(&mirror).unwrap()] {
        let longest = "n".repeat(255);
        stash.save(&longest, &1u8, &[]).unwrap();
        assert_eq!(stash.load::<u8>(&longest).unwrap(), 1);
        // 256 plain bytes, and 100 bytes that escape to 300 (`/` is `%2F`).
        for name in ["n".repeat(256), "/".repeat(100), "x".repeat(1024)] {
            let err = stash.save(&name, &1u8, &[]).unwrap_err();
            assert!(!matches!(err, StoreError::Io { .. }), "{err:?}");
            assert!(err.to_string().contains("at most 255"), "{err}");
            let err = stash.load::<u8>(&name).unwrap_err();
            assert!(err.to_string().contains("at most 255"), "{err}");
        }
        assert_eq!(stash.names("").unwrap(), [longest]);
        assert!(stash.verify().unwrap().problems.is_empty());
    }
}
