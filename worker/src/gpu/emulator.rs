//! Test support: runs a [`Launch`] through the CPU emulation of the kernel sources
//! (`cuda/emu.h`, driven by `cuda/emu_main.cpp`), built once per test process with the host's
//! C++ compiler (`c++`, or `CXX`). While [`enable`]'s guard lives, the model's fused paths run
//! on the CPU through it, so the tests check the kernels, their launch descriptions and the
//! model's dispatch against the candle compositions they replace.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result, Tensor};

use super::launch::{Arg, Launch};

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
}

/// Fused paths run through the emulation on this thread until the guard is dropped.
pub struct Enabled(());

impl Drop for Enabled {
    fn drop(&mut self) {
        ON.with(|on| on.set(false));
    }
}

pub fn enable() -> Enabled {
    ON.with(|on| on.set(true));
    Enabled(())
}

pub fn enabled() -> bool {
    ON.with(|on| on.get())
}

/// One buffer of a launch: its bytes, the byte offset the kernel's pointer starts at, and
/// whether the launch writes it (then it is read back).
pub struct Buffer {
    pub bytes: Vec<u8>,
    pub offset: usize,
    pub write: bool,
}

impl Buffer {
    pub fn input(storage: &CpuStorage, offset_elements: usize) -> Result<Self> {
        let size = storage.dtype().size_in_bytes();
        Ok(Self {
            bytes: to_bytes(storage)?,
            offset: offset_elements * size,
            write: false,
        })
    }

    pub fn output(dtype: DType, len: usize) -> Self {
        // A pattern no kernel writes by accident, so an element left unwritten shows.
        Self {
            bytes: vec![0x7f; len * dtype.size_in_bytes()],
            offset: 0,
            write: true,
        }
    }
}

pub fn to_bytes(s: &CpuStorage) -> Result<Vec<u8>> {
    Ok(match s {
        CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        CpuStorage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        other => candle_core::bail!(
            "the emulation takes f32, f16 or bf16, not {:?}",
            other.dtype()
        ),
    })
}

pub fn from_bytes(dtype: DType, b: &[u8]) -> Result<CpuStorage> {
    let u16s = || b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F16 => CpuStorage::F16(u16s().map(half::f16::from_bits).collect()),
        DType::BF16 => CpuStorage::BF16(u16s().map(half::bf16::from_bits).collect()),
        other => candle_core::bail!("the emulation takes f32, f16 or bf16, not {other:?}"),
    })
}

fn cuda_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu/cuda")
}

/// The emulator binary, compiled on first use (and reused across test runs while the
/// sources are unchanged).
fn binary() -> Result<&'static Path> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(build)
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn build() -> std::result::Result<PathBuf, String> {
    let dir = cuda_dir();
    let mut hash = super::source_hash();
    for f in ["emu.h", "emu_main.cpp"] {
        let text = std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"))?;
        hash = super::fnv1a(hash, &text);
    }
    let bin = std::env::temp_dir().join(format!("tessera-kernel-emu-{hash:016x}"));
    if bin.exists() {
        return Ok(bin);
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let tmp = bin.with_extension(format!("tmp{}", std::process::id()));
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Wno-unknown-pragmas", "-Wno-clobbered", "-o"])
        .arg(&tmp)
        .arg(dir.join("emu_main.cpp"))
        .output()
        .map_err(|e| {
            format!("the kernel emulation needs a C++ compiler ({cxx}: {e}); install one (Debian: build-essential) or set CXX")
        })?;
    if !out.status.success() {
        return Err(format!(
            "compiling the kernel emulation failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::rename(&tmp, &bin).map_err(|e| e.to_string())?;
    Ok(bin)
}

/// Runs `launches` in order over the `inputs` (storage and start offset in elements) followed
/// by fresh `outputs` (element type and length); returns the first output.
pub fn run_op(
    launches: &[Launch],
    inputs: &[(&CpuStorage, usize)],
    outputs: &[(DType, usize)],
) -> Result<CpuStorage> {
    let mut bufs = inputs
        .iter()
        .map(|(s, offset)| Buffer::input(s, *offset))
        .collect::<Result<Vec<_>>>()?;
    bufs.extend(
        outputs
            .iter()
            .map(|&(dtype, len)| Buffer::output(dtype, len)),
    );
    for l in launches {
        run(l, &mut bufs)?;
    }
    from_bytes(outputs[0].0, &bufs[inputs.len()].bytes)
}

/// Runs one launch over `buffers`; the written ones are read back in place.
pub fn run(l: &Launch, buffers: &mut [Buffer]) -> Result<()> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let bin = binary()?;
    let dir = std::env::temp_dir().join(format!(
        "tessera-emu-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = |i: usize| dir.join(format!("buf{i}.bin"));
    for (i, b) in buffers.iter().enumerate() {
        std::fs::write(path(i), &b.bytes)?;
    }
    let (gx, gy, gz) = l.grid;
    let mut cmd = Command::new(bin);
    cmd.arg(&l.kernel)
        .args([gx, gy, gz, l.threads].map(|v| v.to_string()));
    for a in &l.args {
        cmd.arg(match *a {
            Arg::Buf(i) => {
                let kind = if buffers[i].write { 'o' } else { 'b' };
                format!("{kind}:{}:{}", path(i).display(), buffers[i].offset)
            }
            Arg::I32(v) => format!("i:{v}"),
            Arg::I64(v) => format!("l:{v}"),
            // Rust's shortest round-trip form, which strtof reads back exactly.
            Arg::F32(v) => format!("f:{v:?}"),
        });
    }
    let out = cmd.output()?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        candle_core::bail!(
            "emulated {} failed: {}",
            l.kernel,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (i, b) in buffers.iter_mut().enumerate() {
        if b.write {
            b.bytes = std::fs::read(path(i))?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Relative L2 error of `a` against the reference `b`, in f32: how the tests compare a kernel
/// with the composition it replaces.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).expect("an f32 copy");
    let (a, b) = (f32s(a), f32s(b));
    let sum = |t: Tensor| {
        t.sqr()
            .and_then(|s| s.sum_all())
            .and_then(|s| s.to_scalar::<f32>())
    };
    let num = sum((&a - &b).expect("tensors of one shape")).expect("a sum");
    (num / sum(b).expect("a sum")).sqrt()
}
