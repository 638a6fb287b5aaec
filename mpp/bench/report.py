"""What a training benchmark's result says about where it ran, the name of its file under
benchmarks/results/, and its rows of the README's table (scripts/bench_train.py).
"""
from __future__ import annotations

import platform
import re

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def result_name(device: torch.device, model: str, image_size: int, dtype: str, compile: bool, compile_scope: str,
                default_malloc: bool) -> str:
    """train-<device>-<model>-<size>px-<dtype>[-compile | -compile-blocks][-default-malloc], without ".json"."""
    name = f"train-{slug(device_name(device).split(' (')[0])}-{slug(model)}-{image_size}px-{dtype}"
    name += ("-compile-blocks" if compile_scope == "blocks" else "-compile") if compile else ""
    return name + ("-default-malloc" if default_malloc else "")


def markdown(result: dict) -> str:
    """The README table rows of one result."""
    a = result["args"]
    setup = f"{a['model']} {result['image_size']} px, batch {a['batch_size']}, {a['dtype']}" + (
        (", compile (blocks)" if a.get("compile_scope") == "blocks" else ", compile") if a["compile"] else "")
    rows = []
    for c in result["cases"]:
        rows.append(f"| {result['device']} | {setup} | {c['impl']} {c['objective']} | {c['images_per_s']:.1f} | "
                    f"{c['step_ms']:.1f} | {c['peak_mb']:.0f} | {c['gflops_per_image']:.2f} | {100 * c['mfu']:.1f}% |")
    r, ci = result["ratios"], result["ratio_intervals"]

    def ratio(key: str) -> str:  # the median and its 95% interval
        return f"{r[key]:.3f}× [{ci[key]['low']:.3f}, {ci[key]['high']:.3f}]"

    rows.append(f"| | | **ours/timm** MPP {ratio('ours/timm mpp')}, supervised {ratio('ours/timm supervised')}; "
                f"**MPP/supervised** step (ours) {ratio('mpp/supervised step ours')}, FLOPs "
                f"{result['flop_ratios']['mpp/supervised step ours']:.3f}× | | | | | |")
    if result.get("loader"):
        rows.append(f"| | | **loader** {result['loader']['images_per_s']:.0f} images/s = "
                    f"{result['loader_headroom']:.1f}× the fastest case | | | | | |")
    return "\n".join(rows)
