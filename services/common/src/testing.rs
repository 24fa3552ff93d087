//! Test support for other crates' tests (feature `testing`): a throwaway `redis-server`, started from `PATH` on a
//! free 127.0.0.1 port with persistence off, and killed on drop. It can be stopped and restarted on the same port, or
//! frozen (SIGSTOP) to play a slow Redis. [`RedisServer::start_tls`] also serves TLS on a second port.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A running (or stopped) `redis-server` child process.
pub struct RedisServer {
    port: u16,
    /// The TLS port and the server's arguments for it, when serving TLS.
    tls: Option<(u16, Vec<String>)>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(|| None)
    }

    /// Like [`start`](Self::start), and also serves TLS on a second free port with the certificate and key given
    /// (PEM; clients need no certificate). The plain port stays open so readiness can be probed.
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_with(|| {
            let port = free_port();
            let args = [
                "--tls-port".to_owned(),
                port.to_string(),
                "--tls-cert-file".to_owned(),
                cert.display().to_string(),
                "--tls-key-file".to_owned(),
                key.display().to_string(),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ];
            Some((port, args.to_vec()))
        })
    }

    fn start_with(tls: impl Fn() -> Option<(u16, Vec<String>)>) -> Self {
        // The ports are free when probed but may be taken before redis binds them; try a few.
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let tls = tls();
            match spawn_and_wait(port, tls.as_ref().map_or(&[][..], |(_, a)| a)) {
                Ok(child) => {
                    return Self {
                        port,
                        tls,
                        child: Some(child),
                    }
                }
                Err(e) => last_err = e,
            }
        }
        panic!("redis-server did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `rediss://localhost:{tls port}/` (the test certificates name `localhost`), when started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls.as_ref().map(|(port, _)| format!("rediss://localhost:{port}/"))
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server and waits for it to exit (its data is gone: persistence is off).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (stopping it first if it runs).
    pub fn restart(&mut self) {
        self.stop();
        // The port was just released; give a lingering bind a few tries.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_and_wait(self.port, self.tls.as_ref().map_or(&[][..], |(_, a)| a)) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) if Instant::now() >= deadline => panic!("redis-server did not restart: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered, like a stalled Redis.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is running");
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("running `kill {sig} {pid}`: {e}"));
        assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port the OS considers free right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Spawns `redis-server` on `port` and waits until it (not another server) answers; on failure the child is reaped.
fn spawn_and_wait(port: u16, extra: &[String]) -> Result<Child, String> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(extra)
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `redis-server` ({e}); install it (e.g. `apt-get install redis-server`) and put it on PATH"
            )
        });
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if server_pid(port) == Some(child.id()) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("redis-server on port {port} exited with {status}"));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "redis-server on port {port} did not answer within {START_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The `process_id` of the server answering on `port`, if one answers `INFO server` (a stray server that won a
/// race for the port answers too, so callers compare the id with their child's).
fn server_pid(port: u16) -> Option<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"INFO server\r\n").ok()?;
    // A bulk string: `$<len>\r\n<len bytes>\r\n`.
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some((head, body)) = text.split_once("\r\n") else {
            continue;
        };
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        if body.len() >= len {
            let line = body.lines().find_map(|l| l.strip_prefix("process_id:"))?;
            return line.trim().parse().ok();
        }
    }
}
