//! Model test: random sequences of saves, tags, deletes, gc and reopen, checked after
//! every step against an in-memory model of what the stash must hold.
use std::collections::BTreeMap;
use std::time::Duration;

use tessera::{Stash, StoreError, Version};

/// A small deterministic generator (xorshift64*), so failures replay from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone)]
struct Entry {
    version: Version,
    value: Vec<u64>,
    tags: BTreeMap<String, String>,
}

const NAMES: [&str; 3] = ["alpha", "beta/gamma", "delta"];

fn check(stash: &Stash, model: &BTreeMap<&str, Vec<Entry>>, step: usize) {
    for name in NAMES {
        let versions = model.get(name).cloned().unwrap_or_default();
        let history = stash.history(name).unwrap();
        assert_eq!(
            history.iter().map(|i| i.version).collect::<Vec<_>>(),
            versions.iter().map(|e| e.version).collect::<Vec<_>>(),
            "step {step}: history of {name}"
        );
        for (info, entry) in history.iter().zip(&versions) {
            assert_eq!(info.tags, entry.tags, "step {step}: tags of {name} {}", info.version);
        }
        match versions.last() {
            Some(latest) => assert_eq!(stash.load::<Vec<u64>>(name).unwrap(), latest.value, "step {step}"),
            None => assert!(matches!(stash.load::<Vec<u64>>(name), Err(StoreError::NotFound { .. }))),
        }
        if let Some(entry) =
            versions.iter().rev().find(|e| e.tags.get("mark").map(String::as_str) == Some("x"))
        {
            assert_eq!(stash.load_tagged::<Vec<u64>>(name, "mark", "x").unwrap(), entry.value, "step {step}");
        }
    }
    let listed: Vec<String> = stash.list("").unwrap().into_iter().map(|i| i.name).collect();
    let expected: Vec<String> =
        model.iter().filter(|(_, v)| !v.is_empty()).map(|(n, _)| n.to_string()).collect();
    assert_eq!(listed, expected, "step {step}: list");
}

#[test]
fn random_operations_match_the_model() {
    for seed in [1u64, 0x9E37_79B9_7F4A_7C15, 42] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stash");
        let mut stash = Stash::open(&root).unwrap();
        let mut model: BTreeMap<&str, Vec<Entry>> = BTreeMap::new();
        let mut rng = Rng(seed);
        for step in 0..150 {
            let name = NAMES[rng.below(NAMES.len())];
            match rng.below(10) {
                0..=4 => {
                    // Values share long runs across saves, so chunks are deduplicated;
                    // some are large enough for several chunks.
                    let len = if rng.below(8) == 0 { 1_200_000 } else { rng.below(2000) };
                    let base = rng.below(3) as u64;
                    let value: Vec<u64> = (0..len as u64).map(|i| i / 7 + base).collect();
                    let tags: Vec<(&str, &str)> =
                        if rng.below(3) == 0 { vec![("mark", "x")] } else { vec![] };
                    let version = stash.save(name, &value, &tags).unwrap();
                    let tags = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                    model.entry(name).or_default().push(Entry { version, value, tags });
                }
                5 => {
                    let versions = model.entry(name).or_default();
                    if !versions.is_empty() {
                        let i = rng.below(versions.len());
                        stash.tag(name, versions[i].version, "mark", "x").unwrap();
                        versions[i].tags.insert("mark".into(), "x".into());
                    }
                }
                6 => {
                    let versions = model.entry(name).or_default();
                    if versions.is_empty() {
                        assert!(matches!(stash.delete(name, None), Err(StoreError::NotFound { .. })));
                    } else if rng.below(2) == 0 {
                        let i = rng.below(versions.len());
                        assert_eq!(stash.delete(name, Some(versions[i].version)).unwrap(), 1);
                        versions.remove(i);
                    } else {
                        assert_eq!(stash.delete(name, None).unwrap(), versions.len());
                        versions.clear();
                    }
                }
                7 => {
                    stash.gc_with_grace(Duration::ZERO).unwrap();
                }
                8 => {
                    // Restart: drop the handle (and its index) and open again.
                    drop(stash);
                    stash = Stash::open(&root).unwrap();
                }
                _ => {
                    let report = stash.verify().unwrap();
                    assert!(report.problems.is_empty(), "step {step}: {:?}", report.problems);
                }
            }
            check(&stash, &model, step);
        }
        // After a final gc, every chunk on disk is referenced by some live version.
        stash.gc_with_grace(Duration::ZERO).unwrap();
        let report = stash.gc_with_grace(Duration::ZERO).unwrap();
        assert_eq!(report.chunks_deleted, 0);
        assert_eq!(stash.stats().unwrap().chunks, report.chunks_live);
    }
}
