"""The kernels' launch configurations: tile sizes, warps, pipeline stages and program counts, fixed
heuristics (no autotuning), with the reasons for each. Private to this package: the kernel files'
launchers read them, under names of their own that the tests replace (attention's `_configs`,
layer_norm's `_num_warps` and `_bwd_num_programs`); nothing else does.
"""
from __future__ import annotations

import functools

import torch

from triton_kernels.gate import interpreting

LAYER_NORM_INTERPRETER_PROGRAMS = 4  # backward programs under TRITON_INTERPRET=1: few, so each gets many rows


# Attention's configurations, keyed on the padded head dim and dtype.
# GPU (chosen for H100/H200, also fine on A100; checked by compiling for sm_90 and sm_80 with
# ptxas -v: no register spills, shared memory <= 128 KB; speed not measured):
#   forward: BLOCK_M=128 queries x BLOCK_N=64 keys (the FA2 / Triton-tutorial shape), 8 warps (two
#     Hopper warpgroups of 64 rows each; ~120-180 registers/thread, where 4 warps need ~230 at D=64),
#     3 stages to pipeline the K/V loads (128 KB of shared memory at D=128).
#   backward: the looped-over operand is the small one (tutorial shape): dk/dv programs hold
#     BLOCK_N=128 keys (64 at D=128) and step 32 queries, 8 warps; dq programs hold 128 queries
#     (64 at D=128) and step 32 keys, 4 warps; 3 stages. D=128 halves the held block because the
#     dk+dv fp32 accumulators plus k, v otherwise run out of registers.
#   fp32 (the IEEE test path: FMA, not tensor cores): 64/32-row tiles, 8 warps, 2 stages; larger
#     fp32 tiles spill.
# Interpreter: 64 x 32 tiles (valid GPU shapes; fewer, larger numpy ops run faster there than
#   small tiles), with BLOCK_M != BLOCK_N so a mix-up of the two shows up in the tests.
def attention_configs(block_d: int, dtype: torch.dtype, interpreted: bool) -> dict[str, dict[str, int]]:
    """{"fwd", "dkdv", "dq", "pre" (the backward's preprocess): that kernel's launch keywords}, for the
    padded head dim `block_d` and the inputs' dtype; `interpreted`: Triton's interpreter runs them."""
    if interpreted:
        return {"fwd": {"BLOCK_M": 64, "BLOCK_N": 32}, "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
                "dq": {"BLOCK_M": 64, "BLOCK_N": 32}, "pre": {"BLOCK_M": 64}}
    if dtype == torch.float32:
        return {"fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
                "dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
                "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
                "pre": {"BLOCK_M": 64, "num_warps": 4}}
    held = 128 if block_d <= 64 else 64
    return {"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
            "dkdv": {"BLOCK_M": 32, "BLOCK_N": held, "num_warps": 8, "num_stages": 3},
            "dq": {"BLOCK_M": held, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
            "pre": {"BLOCK_M": 128, "num_warps": 4}}


def layer_norm_warps(block_d: int) -> int:
    """Warps for one LayerNorm row of `block_d` lanes (forward and backward)."""
    # ~4-16 elements per thread: 16-byte vector loads, bounded registers, cheap tree reductions.
    if block_d <= 1024:
        return 4
    if block_d <= 4096:
        return 8
    if block_d <= 16384:
        return 16
    return 32


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def layer_norm_bwd_programs(rows: int, device: torch.device, num_warps: int) -> int:
    """How many programs the LayerNorm backward splits `rows` between (each a contiguous chunk)."""
    if device.type == "cuda" and not interpreting():
        # 16 warps (512 threads) per SM: all programs are resident at once at <= 128 registers per
        # thread, so no second wave runs a whole chunk after the first (each program loops over
        # ~rows / programs rows); the partial buffer stays small (e.g. 528 x D fp32 on an H100).
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = _sm_count(index) * max(1, 16 // num_warps)
    else:
        target = LAYER_NORM_INTERPRETER_PROGRAMS
    return min(rows, target)
