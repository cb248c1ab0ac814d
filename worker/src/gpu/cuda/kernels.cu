// Tessera's fused GPU kernels, compiled to PTX by build_ptx.sh (nvcc 13.0, compute_80 so one
// PTX runs on A100/A800 and H100/H200) into ../ptx/, which is committed: the CUDA build of
// tessera needs no toolkit for them. Each kernel's CPU reference is the candle composition it
// replaces (worker/src/gpu/*.rs); emu.h runs these same sources on the CPU in the tests.
#include "flash_attn.cuh"
#include "geglu.cuh"
#include "group_norm.cuh"

TS_FLASH_ATTN(tessera_flash_attn_f16_d16, ts::F16, 16)
TS_FLASH_ATTN(tessera_flash_attn_f16_d32, ts::F16, 32)
TS_FLASH_ATTN(tessera_flash_attn_f16_d64, ts::F16, 64)
TS_FLASH_ATTN(tessera_flash_attn_f16_d128, ts::F16, 128)
TS_FLASH_ATTN(tessera_flash_attn_bf16_d16, ts::BF16, 16)
TS_FLASH_ATTN(tessera_flash_attn_bf16_d32, ts::BF16, 32)
TS_FLASH_ATTN(tessera_flash_attn_bf16_d64, ts::BF16, 64)
TS_FLASH_ATTN(tessera_flash_attn_bf16_d128, ts::BF16, 128)

TS_GROUP_NORM(f32, ts::F32)
TS_GROUP_NORM(f16, ts::F16)
TS_GROUP_NORM(bf16, ts::BF16)

TS_GEGLU(f32, ts::F32)
TS_GEGLU(f16, ts::F16)
TS_GEGLU(bf16, ts::BF16)
