//! Real servers on loopback for the remote backends: `s3s-fs` on a temp dir, and a
//! throwaway PostgreSQL cluster in a temp dir (run as the `postgres` user when root).
#![allow(dead_code)]
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 30 s");
}

/// Finds a program on PATH or in cargo's bin directory.
fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    dirs.extend(cargo_home.map(|c| c.join("bin")));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// An `s3s-fs` server serving one bucket from a temp dir.
pub(crate) struct S3Server {
    child: Child,
    _dir: tempfile::TempDir,
    pub(crate) port: u16,
}

impl S3Server {
    pub(crate) fn start(bucket: &str) -> S3Server {
        let program = find_program("s3s-fs").expect(
            "s3s-fs not found on PATH or in ~/.cargo/bin: run scripts/install-deps.sh (the s3 tests need it)",
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(bucket)).unwrap();
        let port = free_port();
        let mut child = Command::new(program)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                "AKTEST",
                "--secret-key",
                "SKTEST",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        wait_for_port(port, "s3s-fs", &mut child);
        S3Server { child, _dir: dir, port }
    }

    pub(crate) fn url(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{}&region=us-east-1&access_key_id=AKTEST&secret_access_key=SKTEST",
            self.port
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster in a temp dir, on a free loopback port, trust authentication.
pub(crate) struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    as_postgres: bool,
    pub(crate) port: u16,
}

fn pg_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL server not found under /usr/lib/postgresql/*/bin: run scripts/install-deps.sh (the postgres tests need it)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    pub(crate) fn start() -> PgServer {
        let bin = pg_bin_dir();
        let as_postgres = is_root();
        // PostgreSQL refuses to run as root: the cluster belongs to the `postgres` user.
        let dir = std::env::temp_dir().join(format!("tessera-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        if as_postgres {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(&dir).status().unwrap();
            assert!(status.success(), "chown {} to postgres failed", dir.display());
        }
        let data = dir.join("data");
        let server = PgServer { bin, data, dir, as_postgres, port: free_port() };
        server.run(
            "initdb",
            &["-D", &server.data.display().to_string(), "--auth=trust", "-U", "postgres", "--no-sync"],
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on",
            server.port,
            server.dir.display()
        );
        server.run(
            "pg_ctl",
            &[
                "-D",
                &server.data.display().to_string(),
                "-l",
                &server.dir.join("log").display().to_string(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        server
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let output = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&program).args(args).current_dir(&self.dir).output()
        }
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub(crate) fn url(&self, table: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?table={table}", self.port)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The answer of one SQL query, through `psql` (unaligned, tuples only).
    #[allow(dead_code)] // (used by the CLI tests only)
    pub(crate) fn query(&self, sql: &str) -> String {
        let port = self.port.to_string();
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "postgres", "-Atc", sql])
            .output()
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let program = self.bin.join("pg_ctl");
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&program).args(args).output()
        } else {
            Command::new(&program).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
