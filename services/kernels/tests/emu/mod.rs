//! Support for `emulated.rs`: compiles `emu/harness.cpp` (the unmodified `cuda/*.cu` kernels over the CPU CUDA
//! emulator) once per test process with `$CXX` (else `c++`), writes job files from the crate's launch plans, runs
//! the harness under a scheduling order and reads the output buffers back; plus tensor <-> bytes helpers and a
//! deterministic input generator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use mip_kernels::plan::{Arg, Buf, Launch};

/// Schedule orders every case runs under; their results must be bit-identical.
/// Round-robin orders keep warps about in lockstep; the greedy ones let one warp run far ahead (races between warps).
pub const ORDERS: [&str; 5] = ["forward", "reverse", "shuffle:7", "greedy", "greedy-reverse"];
/// Longest one harness run may take (a buggy kernel may loop forever).
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The compiled harness (compiled on first use; panics with the compiler's stderr when that fails).
pub fn harness() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match compile() {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    })
}

fn compile() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mip-kernels-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = dir.join("harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-fno-strict-aliasing",
            "-Wall",
            "-Wno-unknown-pragmas",
            "-I",
        ])
        .arg(root.join("emu"))
        .arg("-o")
        .arg(&bin)
        .arg(root.join("emu/harness.cpp"))
        .output()
        .with_context(|| format!("cannot run the C++ compiler `{cxx}` (set $CXX, or install g++)"))?;
    if !out.status.success() {
        bail!(
            "the C++ compiler `{cxx}` failed on emu/harness.cpp ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(bin)
}

/// A job file under construction, in its own temporary directory.
pub struct Job {
    dir: tempfile::TempDir,
    lines: Vec<String>,
}

impl Job {
    pub fn new() -> Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
            lines: Vec::new(),
        })
    }

    /// A device buffer filled from `bytes`.
    pub fn input(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.path().join(format!("{name}.in"));
        std::fs::write(&path, bytes)?;
        self.lines
            .push(format!("buffer {name} {} in {}", bytes.len(), path.display()));
        Ok(())
    }

    /// A device buffer of `bytes` bytes filled with 0xff (NaN in every float type).
    pub fn poisoned(&mut self, name: &str, bytes: usize) {
        self.lines.push(format!("buffer {name} {bytes} poison"));
    }

    /// A launch of a plan; `bind` maps each buffer argument to a job buffer and a byte offset.
    pub fn launch(&mut self, l: &Launch, bind: impl Fn(Buf) -> (&'static str, usize)) {
        let mut line = format!(
            "launch {} {} {} {} {} {} {}",
            l.kernel, l.grid.0, l.grid.1, l.grid.2, l.block.0, l.block.1, l.block.2
        );
        for a in &l.args {
            let tok = match *a {
                Arg::Buf(b) => {
                    let (name, off) = bind(b);
                    format!("buf:{name}:{off}")
                }
                Arg::I32(v) => format!("i32:{v}"),
                Arg::I64(v) => format!("i64:{v}"),
                Arg::F32(v) => format!("f32:{}", v.to_bits()),
            };
            line.push(' ');
            line.push_str(&tok);
        }
        self.lines.push(line);
    }

    pub fn output(&mut self, name: &str) {
        self.lines.push(format!("output {name}"));
    }

    /// Runs the job under `order`; returns every output buffer by name.
    pub fn run(&self, order: &str) -> Result<HashMap<String, Vec<u8>>> {
        let job = self.dir.path().join("job.txt");
        std::fs::write(&job, self.lines.join("\n") + "\n")?;
        let out_dir = self.dir.path().join(order.replace(':', "-"));
        std::fs::create_dir_all(&out_dir)?;
        let mut child = Command::new(harness())
            .arg(&job)
            .arg(order)
            .arg(&out_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the emulator harness")?;
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if start.elapsed() > RUN_LIMIT {
                child.kill()?;
                bail!("the emulated kernels ran longer than {RUN_LIMIT:?} under order {order} (endless loop?)");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            e.read_to_string(&mut stderr)?;
        }
        if !status.success() {
            bail!("emulated run under order {order} failed ({status}):\n{stderr}");
        }
        let mut outs = HashMap::new();
        for line in &self.lines {
            if let Some(name) = line.strip_prefix("output ") {
                outs.insert(name.to_owned(), std::fs::read(out_dir.join(format!("{name}.bin")))?);
            }
        }
        Ok(outs)
    }

    /// Runs under every order of [`ORDERS`]; fails unless they agree bit for bit on `output`. Returns its bytes.
    pub fn run_all_orders(&self, output: &str) -> Result<Vec<u8>> {
        let mut first: Option<Vec<u8>> = None;
        for order in ORDERS {
            let bytes = self.run(order)?.remove(output).context("missing output")?;
            match &first {
                None => first = Some(bytes),
                Some(f) if *f != bytes => {
                    let at = f.iter().zip(&bytes).position(|(a, b)| a != b).unwrap_or(0);
                    bail!(
                        "`{output}` under order {order} differs from order {} (first at byte {at})",
                        ORDERS[0]
                    );
                }
                Some(_) => {}
            }
        }
        first.context("no orders")
    }
}

/// The bytes of a contiguous tensor's elements (little endian).
pub fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => bail!("to_bytes: {other:?}"),
    })
}

/// A tensor of `dtype` and `shape` from little-endian element bytes, converted to f32.
pub fn f32_from_bytes(bytes: &[u8], dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    let vals: Vec<f32> = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => bail!("f32_from_bytes: {other:?}"),
    };
    Ok(Tensor::from_vec(vals, shape, &Device::Cpu)?)
}

/// Deterministic pseudo-random values, roughly normal (mean 0, variance 1), as an f32 tensor of `shape`.
pub fn randn(seed: u64, shape: impl Into<Shape>) -> Result<Tensor> {
    let shape = shape.into();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    // The sum of 4 uniforms on [-0.5, 0.5) has variance 1/3.
    let vals: Vec<f32> = (0..shape.elem_count())
        .map(|_| (uniform() + uniform() + uniform() + uniform()) * 3f32.sqrt())
        .collect();
    Ok(Tensor::from_vec(vals, shape, &Device::Cpu)?)
}

/// Largest `|got - want| / max(1, |want|)`; infinite when any value is NaN (e.g. an element never written).
pub fn max_rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    if g.len() != w.len() {
        bail!("{} values, expected {}", g.len(), w.len());
    }
    let mut worst = 0f32;
    for (a, b) in g.iter().zip(&w) {
        let e = (a - b).abs() / b.abs().max(1.0);
        worst = if e.is_nan() { f32::INFINITY } else { worst.max(e) };
    }
    Ok(worst)
}
