//! Damage is reported, never hidden: flipped, truncated and missing chunks, garbled
//! records and a garbled index each give a clear error naming what is damaged.
use std::path::{Path, PathBuf};

use ndarray::Array1;
use tessera::{Stash, StoreError};

fn setup() -> (tempfile::TempDir, PathBuf, Stash, Array1<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    let stash = Stash::open(&root).unwrap();
    let a = Array1::from_iter((0..2_000_000).map(|i| i as f32)); // 2 chunks
    stash.save("weights/layer1", &a, &[]).unwrap();
    stash.save("other", &"fine".to_string(), &[]).unwrap();
    (dir, root, stash, a)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

/// The chunk files of `name`'s latest version.
fn chunk_files(root: &Path, stash: &Stash, name: &str) -> Vec<PathBuf> {
    let before: Vec<PathBuf> = files(&root.join("chunks"));
    let info = stash.info(name, None).unwrap();
    assert!(info.chunks >= 1);
    // Chunks of `name` are the ones the other entry does not use: `other` is one small chunk.
    let other = stash.info("other", None).unwrap();
    assert_eq!(other.chunks, 1);
    let other_chunk =
        before.iter().find(|p| std::fs::metadata(p).unwrap().len() == other.size).cloned().unwrap();
    before.into_iter().filter(|p| *p != other_chunk).collect()
}

fn record_file(root: &Path, name_segment: &str) -> PathBuf {
    files(&root.join("records").join(name_segment)).pop().unwrap()
}

#[test]
fn flipped_byte_in_a_chunk_is_a_checksum_error_naming_the_entry() {
    let (_dir, root, stash, _) = setup();
    let chunk = &chunk_files(&root, &stash, "weights/layer1")[0];
    let mut bytes = std::fs::read(chunk).unwrap();
    bytes[12345] ^= 0x01;
    std::fs::write(chunk, &bytes).unwrap();
    let err = stash.load::<Array1<f32>>("weights/layer1").unwrap_err();
    assert!(matches!(err, StoreError::Checksum { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("weights/layer1") && message.contains("checksum"), "{message}");
    let report = stash.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].to_string().contains("weights/layer1"));
    // Other entries are unaffected.
    assert_eq!(stash.load::<String>("other").unwrap(), "fine");
}

#[test]
fn truncated_and_missing_chunks_are_reported() {
    let (_dir, root, stash, _) = setup();
    let chunks = chunk_files(&root, &stash, "weights/layer1");
    let len = std::fs::metadata(&chunks[0]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&chunks[0]).unwrap().set_len(len / 2).unwrap();
    let err = stash.load::<Array1<f32>>("weights/layer1").unwrap_err();
    assert!(matches!(err, StoreError::ChunkLength { .. }), "{err:?}");
    assert!(err.to_string().contains("weights/layer1"));
    std::fs::remove_file(&chunks[0]).unwrap();
    let err = stash.load::<Array1<f32>>("weights/layer1").unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk { .. }), "{err:?}");
    assert!(err.to_string().contains("weights/layer1") && err.to_string().contains("missing"));
    assert_eq!(stash.verify().unwrap().problems.len(), 1);
}

#[test]
fn truncated_or_garbled_records_are_clear_errors() {
    let (_dir, root, stash, a) = setup();
    let v1 = stash.info("weights/layer1", None).unwrap().version;
    stash.save("weights/layer1", &(&a + 1.0), &[]).unwrap();
    let record = record_file(&root, "weights%2Flayer1");
    let bytes = std::fs::read(&record).unwrap();
    for damaged in [
        bytes[..bytes.len() / 2].to_vec(),
        Vec::new(),
        b"garbage garbage garbage garbage garbage!!".to_vec(),
        {
            let mut b = bytes.clone();
            let last = b.len() - 3;
            b[last] ^= 0xff;
            b
        },
    ] {
        std::fs::write(&record, &damaged).unwrap();
        let err = stash.load::<Array1<f32>>("weights/layer1").unwrap_err();
        assert!(matches!(err, StoreError::CorruptRecord { .. }), "{err:?}");
        assert!(err.to_string().contains("weights%2Flayer1") && err.to_string().contains("corrupt"), "{err}");
        assert!(matches!(stash.history("weights/layer1"), Err(StoreError::CorruptRecord { .. })));
        // gc refuses to guess what a damaged record referenced.
        assert!(matches!(
            stash.gc_with_grace(std::time::Duration::ZERO),
            Err(StoreError::CorruptRecord { .. })
        ));
        assert_eq!(stash.verify().unwrap().problems.len(), 1);
        // The older version is still readable by id.
        assert_eq!(stash.load_version::<Array1<f32>>("weights/layer1", v1).unwrap(), a);
    }
    // A stray file in the records directory is reported too, not ignored or panicked on
    // (stray_files_in_records_are_reported_by_verify_and_skipped_by_list goes on).
    std::fs::write(root.join("records/other/not-a-version"), b"x").unwrap();
    let problems = stash.verify().unwrap().problems;
    assert!(problems.iter().any(|p| p.to_string().contains("not-a-version")), "{problems:?}");
}

/// Files under records/ that are not records (notes, a backup's leftovers) are each one
/// problem for verify, which goes on to check everything else; list, names, history and
/// load skip them; gc refuses to run (it cannot tell what they reference).
#[test]
fn stray_files_in_records_are_reported_by_verify_and_skipped_by_list() {
    let (_dir, root, stash, a) = setup();
    std::fs::write(root.join("records/weights%2Flayer1/notes.txt"), b"junk").unwrap();
    std::fs::write(root.join("records/README"), b"junk").unwrap();
    // And real damage elsewhere, which verify must still find.
    let chunk = &chunk_files(&root, &stash, "weights/layer1")[0];
    let mut bytes = std::fs::read(chunk).unwrap();
    bytes[10] ^= 1;
    std::fs::write(chunk, bytes).unwrap();

    let report = stash.verify().unwrap();
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("notes.txt")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("records/README")), "{problems:?}");
    assert!(problems.iter().any(|p| p.contains("checksum mismatch")), "{problems:?}");
    assert_eq!(report.versions, 2);

    let names: Vec<String> = stash.list("").unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["other", "weights/layer1"]);
    assert_eq!(stash.names("").unwrap(), names);
    assert_eq!(stash.history("weights/layer1").unwrap().len(), 1);
    stash.load::<String>("other").unwrap();
    assert!(matches!(stash.gc(), Err(StoreError::CorruptRecord { .. })));
    drop(a);
}

/// A record copied under another name's or version's key (a backup restored to the
/// wrong place) is a corrupt record, not a second listing of the version it holds.
#[test]
fn a_record_under_the_wrong_name_or_version_is_corrupt() {
    let (_dir, root, stash, _) = setup();
    let other = stash.info("other", None).unwrap().version;
    let weights = stash.info("weights/layer1", None).unwrap().version;
    let later = stash.save("weights/layer1", &vec![1u8], &[]).unwrap();
    drop(stash);
    let record_of_other = root.join("records/other").join(other.to_string());
    // Over the latest version of another name (as if restored to the wrong directory),
    let wrong = root.join("records/weights%2Flayer1").join(later.to_string());
    std::fs::copy(&record_of_other, &wrong).unwrap();
    // and under another version id of its own name.
    let misdated = root.join("records/other/0000000000000000000000ab");
    std::fs::copy(&record_of_other, &misdated).unwrap();

    let stash = Stash::open(&root).unwrap();
    let problems: Vec<String> = stash.verify().unwrap().problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().all(|p| p.contains("corrupt") && p.contains("`other`")), "{problems:?}");
    let listed = stash.list("");
    assert!(matches!(listed, Err(StoreError::CorruptRecord { .. })), "{listed:?}");
    let load = stash.load::<Vec<u8>>("weights/layer1");
    assert!(matches!(load, Err(StoreError::CorruptRecord { .. })), "{load:?}");
    // The versions stored where they belong still load.
    assert_eq!(stash.info("weights/layer1", Some(weights)).unwrap().version, weights);
    assert_eq!(stash.load_version::<String>("other", other).unwrap(), "fine");
    let misdated_version = "0000000000000000000000ab".parse().unwrap();
    assert!(matches!(stash.info("other", Some(misdated_version)), Err(StoreError::CorruptRecord { .. })));
}

#[test]
fn garbled_index_is_a_clear_error_not_a_panic() {
    // Damage every index file, then only sled's data file (`db`), then truncate it.
    for mode in ["all", "db", "truncate"] {
        let (_dir, root, stash, a) = setup();
        // Read through the index so that it holds entries, then close it.
        assert_eq!(stash.history("weights/layer1").unwrap().len(), 1);
        drop(stash);
        let index = root.join("index");
        let mut damaged = 0;
        for file in files(&index) {
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            if !file.is_file()
                || std::fs::metadata(&file).unwrap().len() == 0
                || (mode != "all" && name != "db")
            {
                continue;
            }
            let mut bytes = std::fs::read(&file).unwrap();
            if mode == "truncate" {
                bytes.truncate(bytes.len() / 3);
            } else {
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b ^= (i as u8).wrapping_mul(31) | 1;
                }
            }
            std::fs::write(&file, &bytes).unwrap();
            damaged += 1;
        }
        assert!(damaged > 0, "the index holds no files to damage ({mode})");
        let result = std::panic::catch_unwind(|| {
            Stash::open(&root).and_then(|s| s.load::<Array1<f32>>("weights/layer1"))
        });
        let result = result.unwrap_or_else(|_| panic!("opening a garbled index panicked ({mode})"));
        match result {
            Err(err @ StoreError::IndexCorrupt { .. }) => {
                eprintln!("garbled index ({mode}) reported as: {err}");
                assert!(err.to_string().contains("delete the directory"), "{err}");
            }
            // sled may find no valid log entries and start empty; then records rule.
            Ok(loaded) => {
                eprintln!("garbled index ({mode}): sled opened it; the record files rule");
                assert_eq!(loaded, a);
            }
            Err(other) => panic!("unexpected error for a garbled index ({mode}): {other:?}"),
        }
        // Recovery: delete the index; it is rebuilt.
        std::fs::remove_dir_all(&index).unwrap();
        let stash = Stash::open(&root).unwrap();
        assert_eq!(stash.load::<Array1<f32>>("weights/layer1").unwrap(), a);
    }
}

#[test]
fn second_version_differing_in_one_chunk_adds_about_one_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let stash = Stash::open(dir.path().join("stash")).unwrap();
    let n = (64 << 20) / 4; // 64 MiB of f32
    let mut a = Array1::from_iter((0..n).map(|i| i as f32));
    stash.save("big", &a, &[]).unwrap();
    let first = stash.stats().unwrap();
    assert!(first.chunk_bytes >= 64 << 20);
    // Change one element in the middle: one chunk differs.
    a[n / 2 + 17] = -1.0;
    let v2 = stash.save("big", &a, &[]).unwrap();
    let second = stash.stats().unwrap();
    let added = second.chunk_bytes - first.chunk_bytes;
    eprintln!("second version added {added} bytes ({} chunk(s))", second.chunks - first.chunks);
    assert_eq!(second.chunks - first.chunks, 1);
    assert!(added <= tessera::CHUNK_SIZE as u64, "added {added} bytes, more than one chunk");
    assert!(added >= tessera::CHUNK_SIZE as u64 / 2);
    assert_eq!(stash.load_version::<Array1<f32>>("big", v2).unwrap(), a);
}
