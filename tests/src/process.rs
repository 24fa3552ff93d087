//! The `mip` binary as a user runs it: one-shot commands ([`mip`]) and `mip serve …` child processes ([`Served`])
//! that can be terminated (SIGTERM), killed, frozen (SIGSTOP) and thawed; plus temporary folders holding a model
//! bundle over the fixture model and the fixture's reference photos.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a served process may take to exit after SIGTERM.
const EXIT_BOUND: Duration = Duration::from_secs(60);

/// The `mip` binary of this build: `$MIP_BIN`, else `mip` in the target folder these tests were built into.
/// `cargo test --workspace` builds it along with the tests; a lone `cargo test -p mip-tests` does not, so the panic
/// says how to build it.
pub fn mip_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MIP_BIN") {
        return PathBuf::from(p);
    }
    // A test executable lives in `<target>/<profile>/deps/`; cargo puts binaries in `<target>/<profile>/`.
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable sits in <target>/<profile>/deps");
    let bin = profile_dir.join(format!("mip{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "no `mip` binary at {}: run the suite with `cargo test --workspace` (which builds it), build it with \
         `cargo build -p mip-cli`, or set MIP_BIN",
        bin.display()
    );
    bin
}

/// A `mip` command, not yet run.
pub fn mip_cmd() -> Command {
    Command::new(mip_bin())
}

/// Runs `mip args…` to its end.
pub fn mip(args: &[&str]) -> Output {
    mip_cmd().args(args).output().expect("mip runs")
}

/// Standard output and error of a run, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Standard output of a `--json` run, one JSON value per line.
pub fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{}", text(o))))
        .collect()
}

/// An empty folder `mip-tests-{name}-{pid}` under the system's temporary folder.
pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mip-tests-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp");
    dir
}

/// A model bundle over the fixture model (64x64) in `dir/model`, and the fixture's reference photos (`cat_0.png`,
/// `jacket_0.png`) in `dir`; returns the bundle folder.
pub fn fixture_setup(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).expect("model dir");
    mip_worker::testing::fixture_bundle(&model);
    for name in ["cat_0.png", "jacket_0.png"] {
        std::fs::write(dir.join(name), crate::image(name)).expect("reference photo");
    }
    model
}

/// A manifest line (JSONL): the fixture's cat (and jacket, from [`fixture_setup`]) in 64x64, `steps` steps, `seed`.
pub fn item(seed: u64, steps: u32, two_subjects: bool) -> String {
    let mut subjects = vec![serde_json::json!({"name": "cat", "images": ["cat_0.png"]})];
    if two_subjects {
        subjects.push(serde_json::json!({"name": "jacket", "images": ["jacket_0.png"]}));
    }
    serde_json::json!({"prompt": "a cat wearing a jacket", "subjects": subjects, "steps": steps,
        "width": 64, "height": 64, "seed": seed})
    .to_string()
}

/// The PNG files in `dir` (none when it does not exist).
pub fn pngs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect()
}

/// The `summary` line of a `mip submit --json` run.
pub fn summary(lines: &[Value]) -> Value {
    lines
        .iter()
        .find(|l| l["event"] == "summary")
        .cloned()
        .unwrap_or_else(|| panic!("no summary in {lines:?}"))
}

/// A `mip serve …` child process, killed when dropped.
pub struct Served {
    child: Child,
    /// The address it listens on (`127.0.0.1:PORT`), from the first line it printed.
    pub addr: String,
}

impl Served {
    /// Spawns `mip args…` (a `serve` command listening on `127.0.0.1:0`) with `envs`, and reads the address from
    /// its first line of output (`… listening on 127.0.0.1:PORT …`).
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = mip_cmd();
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("`mip {}` starts: {e}", args.join(" ")));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("first line");
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("127.0.0.1:"))
            .map(str::to_owned);
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!("`mip {}` printed no address: {line:?}", args.join(" "));
        };
        Self { child, addr }
    }

    /// `{scheme}://{addr}`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`-STOP`, `-CONT`, `-TERM`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args([sig, &pid]).status().expect("kill runs");
        assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
    }

    /// SIGKILL, then waits until the process is gone (its listening socket closed, so its address can be reused).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (bounded wait; killed past the bound).
    pub fn terminate(mut self) -> ExitStatus {
        self.signal("-TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if start.elapsed() > EXIT_BOUND {
                let _ = self.child.kill();
                panic!("`mip serve` (pid {}) did not exit after SIGTERM", self.pid());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    /// A failed test must not leave the process running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
