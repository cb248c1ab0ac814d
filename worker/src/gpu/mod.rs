//! What makes the GPU path fast, each piece behind a runtime switch ([`switches`]) and each
//! fused kernel with the candle composition it replaces as its reference (the CPU always runs
//! the composition):
//! - [`host`]: host-side levers (no per-allocation CUDA events, a memory pool that keeps its
//!   memory, cached op parameters), the pool's high-water mark, the profiler range;
//! - [`flash_attn`]: attention in one FlashAttention-2-style kernel, no score matrix;
//! - [`group_norm`]: GroupNorm (+ SiLU) in two kernels with f32 statistics;
//! - [`geglu`]: the feed-forward's value · GELU(gate) in one kernel.
//!
//! The kernels' CUDA sources are in `cuda/`, their PTX (nvcc 13.0, `compute_80`) committed in
//! `ptx/` by `cuda/build_ptx.sh`, so building tessera needs no CUDA toolkit for them. In the
//! unit tests the same sources run on the CPU through an emulation of the CUDA features they
//! use (`cuda/emu.h`), launched by the same launch descriptions (`launch.rs`).

pub mod flash_attn;
pub mod geglu;
pub mod group_norm;
pub mod host;
pub mod launch;
pub mod switches;

#[cfg(test)]
pub(crate) mod emulator;

use candle_core::Tensor;

/// The sources the committed PTX is made from, in the order [`source_hash`] reads them.
pub const KERNEL_SOURCES: [&str; 5] = [
    "common.cuh",
    "flash_attn.cuh",
    "geglu.cuh",
    "group_norm.cuh",
    "kernels.cu",
];

/// 64-bit FNV-1a, continued from `h` (start with [`FNV_OFFSET`]).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash `cuda/build_ptx.sh` writes into the PTX's first line: FNV-1a over each source's
/// name and bytes.
pub fn source_hash() -> u64 {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu/cuda");
    KERNEL_SOURCES.iter().fold(FNV_OFFSET, |h, name| {
        let text = std::fs::read(dir.join(name)).unwrap_or_default();
        fnv1a(fnv1a(h, name.as_bytes()), &text)
    })
}

/// Whether a fused kernel with its switch at `lever` runs for `t`: on CUDA devices when the
/// lever is on; in unit tests also on the CPU while the emulation is enabled on this thread.
pub(crate) fn fused_on(t: &Tensor, lever: bool) -> bool {
    #[cfg(test)]
    if emulator::enabled() {
        return true;
    }
    lever && t.device().is_cuda()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_ptx_is_built_from_the_current_sources() {
        let ptx = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu/ptx/kernels.ptx"),
        )
        .unwrap();
        let first = ptx.lines().next().unwrap_or_default();
        let want = format!("// tessera-source-hash: {:016x}", source_hash());
        assert_eq!(
            first, want,
            "worker/src/gpu/ptx/kernels.ptx is stale: run worker/src/gpu/cuda/build_ptx.sh"
        );
        for kernel in [
            "tessera_flash_attn_f16_d64",
            "tessera_flash_attn_bf16_d128",
            "tessera_group_norm_stats_f16",
            "tessera_group_norm_apply_bf16",
            "tessera_geglu_f32",
        ] {
            assert!(
                ptx.contains(&format!(".entry {kernel}(")),
                "{kernel} missing"
            );
        }
    }
}
