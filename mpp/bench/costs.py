"""What one benchmark case's training step costs besides its time (scripts/bench_train.py): the peak
memory it holds, where its time goes by operator, its model FLOPs, and the matmul FLOP/s that MFU
is measured against.
"""
from __future__ import annotations

import time

import torch

from mpp.bench.cases import Case, build_objective, sync


def step_peak_bytes(case: Case) -> int:
    """Peak bytes of one step: resident state plus the most the step holds allocated at once."""
    device = case.images.device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        case.step()
        sync(device)
        return case.resident_bytes() + torch.cuda.max_memory_allocated(device) - before
    # CPU has no allocator statistics: replay the profiler's allocation and free events in time order.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return case.resident_bytes() + peak


def profile_step(case: Case, top: int) -> list[dict]:
    """Where one step's time goes: the `top` operators by self time, CPU time on CPU and GPU kernel
    time on a GPU (Triton kernels appear under their kernel names)."""
    from torch.profiler import ProfilerActivity, profile

    device = case.images.device
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        case.step()
        sync(device)
    averages = prof.key_averages()

    def self_us(event) -> float:
        return getattr(event, "self_device_time_total", 0.0) if cuda else event.self_cpu_time_total

    total = sum(self_us(e) for e in averages) or 1.0
    ranked = sorted(averages, key=self_us, reverse=True)[:top]
    return [{"op": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": e.count} for e in ranked]


def flops_per_image(case: Case) -> float:
    """Model FLOPs of one forward and backward pass, per image (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    # PyTorch's counter knows the GPU attention kernels but not the CPU one: count it the same way.
    custom = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v),
    }
    # Eager (the counter does not see inside a compiled graph), and on PyTorch's ops: our Triton
    # kernels launch no aten ops for the counter to see, and the model's FLOPs do not depend on which
    # kernel computes them. So count them on a twin of the case's model built with PyTorch's ops.
    module = build_objective(case.impl, case.objective, case.config).to(case.images.device)
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        with case.autocast():
            loss = module(case.images, case.labels)[0]
        loss.backward()
    return counter.get_total_flops() / len(case.images)


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`: what a step could reach if it were all matmul.
    The best of several tries: a ceiling measured in a slow moment would inflate MFU."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # (n, n) each
    times = []
    for _ in range(11):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / min(times[1:])
