//! `tessera stash put|get|list|log|show|tag|rm|gc|verify` against a real store directory.
use std::path::Path;
use std::process::Output;

use ndarray::Array1;
use tessera::Stash;

fn tessera(store: &Path, args: &[&str]) -> Output {
    tessera_in(Path::new("."), store, args)
}

fn ok(store: &Path, args: &[&str]) -> String {
    let out = tessera(store, args);
    assert!(
        out.status.success(),
        "tessera stash {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cli_lists_shows_tags_removes_gcs_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    let stash = Stash::open(&root).unwrap();
    let a = Array1::from_iter((0..100_000).map(|i| i as f32));
    let v1 = stash.save("weights", &a, &[("epoch", "1")]).unwrap();
    let v2 = stash.save("weights", &(&a * 3.0), &[("epoch", "2")]).unwrap();
    stash.save("config", &vec!["x".to_string()], &[]).unwrap();
    drop(stash); // release the index, as another process would find it

    let list = ok(&root, &["list"]);
    assert!(list.contains("weights") && list.contains("config"), "{list}");
    assert!(list.contains(&v2.to_string()) && list.contains("ndarray<f32>"), "{list}");
    let list = ok(&root, &["list", "conf"]);
    assert!(list.contains("config") && !list.contains("weights"), "{list}");

    let log = ok(&root, &["log", "weights"]);
    let first = log.find(&v2.to_string()).unwrap();
    let second = log.find(&v1.to_string()).unwrap();
    assert!(first < second, "log lists newest first: {log}");
    assert!(log.contains("epoch=1") && log.contains("epoch=2"));

    let show = ok(&root, &["show", "weights", "--version", &v1.to_string()]);
    assert!(
        show.contains(&v1.to_string()) && show.contains("array f32 [100000]") && show.contains("blake3:"),
        "{show}"
    );
    ok(&root, &["tag", "weights", &v1.to_string(), "best=yes"]);
    let show = ok(&root, &["show", "weights", "--tag", "best=yes"]);
    assert!(show.contains(&v1.to_string()) && show.contains("best=yes"), "{show}");

    let verify = ok(&root, &["verify"]);
    assert!(verify.contains("ok"), "{verify}");

    ok(&root, &["rm", "weights", "--version", &v1.to_string()]);
    let gc = ok(&root, &["gc", "--grace-secs", "0"]);
    assert!(gc.contains("deleted 1 chunks"), "{gc}");
    let stash = Stash::open(&root).unwrap();
    assert_eq!(stash.history("weights").unwrap().len(), 1);
    assert_eq!(stash.load::<Array1<f32>>("weights").unwrap(), &a * 3.0);
    drop(stash);

    // Damage makes verify fail with a message naming the entry.
    for chunk in std::fs::read_dir(root.join("chunks")).unwrap() {
        let path = chunk.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        if bytes.len() > 1000 {
            bytes[500] ^= 0x10;
            std::fs::write(&path, bytes).unwrap();
        }
    }
    let out = tessera(&root, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DAMAGED") && text.contains("weights"), "{text}");

    // Errors are clear and non-zero.
    let out = tessera(&root, &["log", "nothing"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entry `nothing`"));
    ok(&root, &["rm", "weights"]);
    assert!(!ok(&root, &["list"]).contains("weights"));
}

#[test]
fn cli_puts_and_gets_files_by_name_version_and_tag_with_progress() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    // 70 MiB: large enough for progress lines (over 64 MiB), in 18 chunks.
    let first: Vec<u8> = (0..70u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let second = b"a small second version".to_vec();
    std::fs::write(dir.path().join("first.bin"), &first).unwrap();
    std::fs::write(dir.path().join("second.bin"), &second).unwrap();
    let put = |file: &str, tag: &str| {
        let file = dir.path().join(file);
        let out = tessera(&root, &["put", "data/blob", file.to_str().unwrap(), "--tag", tag]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap().trim().to_string(), String::from_utf8(out.stderr).unwrap())
    };
    let (v1, progress) = put("first.bin", "kind=big");
    assert!(progress.contains("saving data/blob") && progress.contains("(100 %)"), "{progress}");
    let (v2, progress) = put("second.bin", "kind=small");
    assert!(!progress.contains("saving"), "no progress for a small file: {progress}");
    assert_ne!(v1, v2);

    let get = |args: &[&str], out: &str| {
        let path = dir.path().join(out);
        let mut all = vec!["get", "data/blob", "-o", path.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = tessera(&root, &all);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        (std::fs::read(path).unwrap(), String::from_utf8(output.stderr).unwrap())
    };
    let (latest, _) = get(&[], "latest.bin");
    assert_eq!(latest, second);
    let (by_version, progress) = get(&["--version", &v1], "v1.bin");
    assert!(by_version == first, "the first version came back different");
    assert!(progress.contains("loading data/blob"), "{progress}");
    let (by_tag, _) = get(&["--tag", "kind=big"], "tagged.bin");
    assert!(by_tag == first, "the tagged version came back different");
    let log = ok(&root, &["log", "data/blob"]);
    assert!(log.contains("kind=big") && log.contains("kind=small") && log.contains("ByteBuf"), "{log}");

    // A missing name fails clearly and writes no file.
    let missing = dir.path().join("missing.bin");
    let out = tessera(&root, &["get", "nothing", "-o", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no entry `nothing`"));
    assert!(!missing.exists());
    let out = tessera(&root, &["put", "x", dir.path().join("absent.bin").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("absent.bin"));
}

/// `tessera stash ARGS --store STORE` run in `cwd`.
fn tessera_in(cwd: &Path, store: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .current_dir(cwd)
        .arg("stash")
        .args(args)
        .arg("--store")
        .arg(store)
        .output()
        .unwrap()
}

#[test]
fn cli_errors_never_print_store_keys_or_passwords() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        "s3://bucket/p?endpoint=http://127.0.0.1:1&access_key_id=a&secret_access_key=S3CRET",
        "postgres://u:S3CRET@127.0.0.1:1/db?table=t",
        "mirror:/nowhere/a,s3://bucket/p?secret_access_key=S3CRET;min_copies=x",
        "s3://bucket/p?secret_access_key=S3CRET&bad=%zz",
    ] {
        let out = tessera_in(dir.path(), store, &["list"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}: {stderr}");
        assert!(!stderr.contains("S3CRET"), "{store}: {stderr}");
        assert!(stderr.contains("opening stash"), "{store}: {stderr}");
    }
    let out = tessera_in(dir.path(), "postgres://u:S3CRET@127.0.0.1:1/db?table=t", &["list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres://u@127.0.0.1:1/db?…"));
}

#[test]
fn cli_refuses_an_empty_store_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let file = dir.path().join("notes.txt");
    for args in [vec!["list"], vec!["put", "n", file.to_str().unwrap()]] {
        let out = tessera_in(dir.path(), "", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("empty"), "{args:?}: {stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["notes.txt"], "the current directory was made a stash");
}

#[test]
fn cli_read_commands_refuse_a_missing_stash_and_put_creates_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("nothere");
    let out_file = dir.path().join("out.bin");
    let version = "0000000000000000000000ab";
    let commands: [&[&str]; 10] = [
        &["list"],
        &["log", "n"],
        &["get", "n", "-o", out_file.to_str().unwrap()],
        &["show", "n"],
        &["verify"],
        &["gc"],
        &["repair"],
        &["tag", "n", version, "k=v"],
        &["rm", "n"],
        &["rm", "n", "--version", version],
    ];
    for args in commands {
        let out = tessera(&root, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("no stash at"), "{args:?}: {stderr}");
        assert!(!root.exists(), "{args:?} created a stash");
    }
    // An empty directory is no stash either (and stays as it was).
    std::fs::create_dir(&root).unwrap();
    assert!(!tessera(&root, &["verify"]).status.success());
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    let file = dir.path().join("in.bin");
    std::fs::write(&file, b"bytes").unwrap();
    ok(&root, &["put", "n", file.to_str().unwrap()]);
    assert!(ok(&root, &["verify"]).contains("ok"));
}

#[test]
fn cli_log_help_matches_its_order() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["stash", "log", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("newest first") && !help.contains("oldest"), "{help}");
    // (cli_lists_shows_tags_removes_gcs_and_verifies checks the order itself.)
}

/// `put NAME -` and `put NAME /dev/stdin` save standard input (a pipe: no length known in
/// advance); `get NAME -o -` streams a version to standard output.
#[test]
fn cli_puts_from_standard_input_and_gets_to_standard_output() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stash");
    // Three chunks and a bit.
    let bytes: Vec<u8> = (0..(3 * tessera::CHUNK_SIZE + 1000) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    for source in ["-", "/dev/stdin"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["stash", "put", "piped", source, "--store"])
            .arg(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = bytes.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "put {source}: {}", String::from_utf8_lossy(&out.stderr));
        writer.join().unwrap().unwrap();
        let version = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let got = tessera(&root, &["get", "piped", "-o", "-", "--version", &version]);
        assert!(got.status.success(), "{}", String::from_utf8_lossy(&got.stderr));
        assert!(
            got.stdout == bytes,
            "get -o - gave {} bytes, not the {} put from {source}",
            got.stdout.len(),
            bytes.len()
        );
    }
    assert_eq!(Stash::open(&root).unwrap().history("piped").unwrap().len(), 2);
    // A missing name writes nothing to standard output.
    let out = tessera(&root, &["get", "nothing", "-o", "-"]);
    assert!(!out.status.success() && out.stdout.is_empty());
}

/// A mirror exists when one of its replicas does: `repair` refills a replica whose
/// directory was deleted (it refused with "no stash" before), and a mirror with no replica
/// left is no stash.
#[test]
fn cli_repair_refills_a_deleted_mirror_replica() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mirror = format!("mirror:{},{}", a.display(), b.display());
    let file = dir.path().join("in.bin");
    std::fs::write(&file, vec![7u8; 300_000]).unwrap();
    let put = tessera_in(dir.path(), &mirror, &["put", "n", file.to_str().unwrap()]);
    assert!(put.status.success(), "{put:?}");
    std::fs::remove_dir_all(&b).unwrap();
    let repair = tessera_in(dir.path(), &mirror, &["repair"]);
    assert!(repair.status.success(), "{}", String::from_utf8_lossy(&repair.stderr));
    let mut copy = Vec::new();
    Stash::open_existing(&b).unwrap().load_to_writer("n", None, &mut copy).unwrap();
    assert_eq!(copy, std::fs::read(&file).unwrap(), "the refilled replica holds the version");
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
    let gone = tessera_in(dir.path(), &mirror, &["verify"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no stash at"), "{gone:?}");
    assert!(!a.exists() && !b.exists(), "a read of a missing mirror made its replicas");
}

/// A remote store read by the CLI must hold a stash: an empty S3 prefix (a mistyped one)
/// is "no stash", without the keys in the message; a prefix with a version lists it.
#[cfg(feature = "s3")]
#[test]
fn cli_read_commands_refuse_an_empty_s3_prefix() {
    let server = super::servers::S3Server::start("cli");
    let dir = tempfile::tempdir().unwrap();
    let empty = tessera_in(dir.path(), server.url("cli", "typo"), &["list"]);
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(!empty.status.success() && stderr.contains("no stash at"), "{stderr}");
    assert!(!stderr.contains("SKTEST"), "{stderr}");
    let file = dir.path().join("in.bin");
    std::fs::write(&file, b"bytes").unwrap();
    let url = server.url("cli", "real");
    assert!(tessera_in(dir.path(), &url, &["put", "n", file.to_str().unwrap()]).status.success());
    let list = tessera_in(dir.path(), &url, &["list"]);
    assert!(list.status.success() && String::from_utf8_lossy(&list.stdout).contains("n "), "{list:?}");
}

/// Likewise a PostgreSQL table: a missing one is "no stash", and the read does not make it
/// (it used to create an empty table for a mistyped name before saying so).
#[cfg(feature = "postgres")]
#[test]
fn cli_read_commands_refuse_a_missing_postgres_table_without_making_it() {
    let server = super::servers::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = tessera_in(dir.path(), server.url("typo"), &["list"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("no stash at"), "{stderr}");
    assert_eq!(server.query("SELECT to_regclass('typo') IS NULL"), "t", "the read made the table");
    let file = dir.path().join("in.bin");
    std::fs::write(&file, b"bytes").unwrap();
    let url = server.url("real");
    assert!(tessera_in(dir.path(), &url, &["put", "n", file.to_str().unwrap()]).status.success());
    let list = tessera_in(dir.path(), &url, &["list"]);
    assert!(list.status.success() && String::from_utf8_lossy(&list.stdout).contains("n "), "{list:?}");
}
