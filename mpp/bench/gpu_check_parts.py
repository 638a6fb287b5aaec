"""The GPU check's parts that run in the check's own code (scripts/gpu_check.py: the entry point, with
the order, limits and budget): versions, attention_bf16, verdicts, compiled_step and tests, each run
as `gpu_check.py --part NAME --result FILE` in a process of its own (`run_part_here`), so that a hung
kernel, an illegal memory access or a timeout ends that part alone. A part writes what it found into
`out` and calls `save()` as it goes, so a part killed from outside keeps what was done; it judges
itself (`out["passed"]`, `out["summary"]`). Under --smoke (CPU, Triton's interpreter) the parts run at
tiny shapes in fp32. torch and the model are imported inside each part: the parent imports this
module to list the parts and must not wait for torch (`--plan`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import platform
import time
import traceback
from dataclasses import replace
from pathlib import Path

from mpp.bench.pytest_record import TestRecorder, count_outcomes
from mpp.core.files import write_json  # atomic: a reader (or a kill) never sees half a file

TEST_FILES = ("tests/test_attention.py", "tests/test_layer_norm.py", "tests/test_kernels_vit.py")
PER_TEST_S = 60  # a test past this fails (SIGALRM) and the rest still run; stacks are dumped at +30 s
# (B, H, Nq, Nk, D): ViT-B/16, S/16 at 224 px, Ti/4 at 32 px, H/14 (head dim 80), B/16 at 384 px, and
# the last block's queries against every key (supervised: the class token; MPP: about half the tokens).
ATTENTION_CASES = [(128, 12, 197, 197, 64), (128, 6, 197, 197, 64), (256, 3, 65, 65, 64), (32, 16, 257, 257, 80),
                   (16, 12, 577, 577, 64), (128, 12, 1, 197, 64), (128, 12, 99, 197, 64)]
SMOKE_ATTENTION_CASES = [(2, 2, 17, 17, 32), (1, 2, 65, 65, 64), (2, 2, 1, 17, 32), (2, 2, 9, 17, 32)]


def _setup(smoke: bool):
    """(torch, device, dtype) for a part: CUDA bf16, or under --smoke CPU fp32 (the interpreter has no bf16)."""
    import torch

    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run the check on a GPU machine, or --smoke on CPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are fp32, not TF32
    return torch, torch.device("cpu" if smoke else "cuda"), torch.float32 if smoke else torch.bfloat16


def part_versions(smoke: bool, out: dict, save) -> None:
    torch, device, dtype = _setup(smoke)

    from mpp.model.kernel_cache import environment, installed_version

    # Versions without importing the packages: a broken triton is a verdict below.
    out["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                       **{name: installed_version(name) for name in ("triton", "timm", "pytest")},
                       "cuda": torch.version.cuda}
    if device.type == "cuda":
        env, props = environment(device), torch.cuda.get_device_properties(device)
        out["versions"] |= {"driver": env["driver"], "cudnn": torch.backends.cudnn.version()}
        out["gpu"] = {"name": props.name, "capability": env["capability"], "memory_GiB": props.total_memory / 2**30,
                      "multiprocessors": props.multi_processor_count}
    out |= {"passed": True, "summary": ", ".join(f"{k} {v}" for k, v in out["versions"].items())}


def part_verdicts(smoke: bool, out: dict, save) -> None:
    """The verified dispatch's verdicts (`resolve`, policy auto, cache off) at S/16 and B/16 training shapes."""
    from dataclasses import asdict

    torch, device, dtype = _setup(smoke)
    from mpp.model.kernel_policy import KernelPolicy, RunShapes, resolve
    from mpp.model.objective import MPPConfig, corrupted_count
    from mpp.model.vit import vit_config

    policy = KernelPolicy.from_flags("auto", "off", environ={})  # no MPP_KERNELS*, no cache: measured here
    warnings, out["verdicts"] = [], {}  # warnings: a kernel failing its check at a training shape, or no triton
    for model in ("Micro/4",) if smoke else ("S/16", "B/16"):
        config = vit_config(model)
        for objective in ("mpp", "supervised"):
            last = corrupted_count(MPPConfig().corrupt_rate, config.num_patches) if objective == "mpp" else 1
            shapes = RunShapes.of(config, 2 if smoke else 128, str(dtype)[6:], backward=True, last_queries=last,
                                  compiled=not smoke)  # as the compiled training parts decide (--compile)
            started = time.monotonic()
            choice = resolve(policy, shapes, device, warn=warnings.append)
            out["verdicts"][f"{model} {objective}"] = {**choice.record(), "shapes": asdict(shapes),
                                                      "seconds": time.monotonic() - started}
            for line in choice.lines():
                print(f"{model} {objective}: {line}", flush=True)
            save()
    out |= {"warnings": warnings, "passed": not warnings}
    out["summary"] = "; ".join(f"{k}: " + " ".join(f"{op} {v['impl']}" for op, v in r["verdicts"].items())
                               for k, r in out["verdicts"].items())


def part_tests(smoke: bool, out: dict, save) -> None:
    try:
        import pytest
    except ImportError:
        raise SystemExit("pytest is not installed here: the tests part needs it (pip install pytest)") from None

    # pytest-timeout, when installed, enforces the limit itself; otherwise a SIGALRM fails a slow test
    # (a test stuck inside one C call is cut by the part's own limit instead, and its stack dumped).
    plugin_timeout = importlib.util.find_spec("pytest_timeout") is not None
    args = ["-q", "-p", "no:cacheprovider", "-o", f"faulthandler_timeout={PER_TEST_S + 30}", *TEST_FILES]
    args += [f"--timeout={PER_TEST_S}"] if plugin_timeout else []
    args += ["-k", "supported"] if smoke else []  # the interpreter takes many minutes: each op's quick checks only
    out |= {"command": ["pytest", *args], "per_test_limit_s": PER_TEST_S,
            "per_test_limit_by": "pytest-timeout" if plugin_timeout else "SIGALRM"}
    code = int(pytest.main(args, plugins=[TestRecorder(out, save, PER_TEST_S, alarm=not plugin_timeout)]))
    failures = {n: t.get("message", "") for n, t in out["tests"].items() if t["outcome"] in ("failed", "error")}
    out |= {"counts": count_outcomes(out["tests"]), "failures": failures, "exit_code": code, "passed": code == 0}
    out["summary"] = ", ".join(f"{n} {k}" for k, n in out["counts"].items()) + f" (pytest exit {code})"


def part_attention(smoke: bool, out: dict, save) -> None:
    torch, device, dtype = _setup(smoke)
    from mpp.model import kernel_measure as measure
    from mpp.model.kernel_policy import RunShapes  # then the norms at the same model's shapes, forward and backward
    from mpp.model.ops import IMPLEMENTATIONS
    from mpp.model.vit import vit_config
    from triton_kernels import attention_ref

    ours, sdpa = IMPLEMENTATIONS["attention"]["triton"], IMPLEMENTATIONS["attention"]["torch"]  # what the ViT calls
    spec = replace(measure.MEASURED["attention"], constants=())  # called as fn(q, k, v): attention_ref's own scale
    out |= {"dtype": str(dtype)[6:], "rule": "error <= 2 x SDPA's error + eps x max|reference| (1 ulp)"
                                             f"; fp32: at least {measure.FP32_TOLERANCE:g} x max(1, max|reference|)",
            "cases": []}
    for B, H, nq, nk, D in SMOKE_ATTENTION_CASES if smoke else ATTENTION_CASES:
        randn = measure.seeded_randn(device, B * 7919 + H * 97 + nq * 13 + nk + D)
        q, k, v, dout = measure.vit_attention_inputs(randn, B, H, nq, nk, D, dtype)  # as the ViT makes them
        args, grads = {"q": q, "k": k, "v": v}, [dout]
        want = measure.run_op(spec, attention_ref, args, grads, True, upcast=True)  # {out, dq, dk, dv}, fp32 math
        theirs, got, again = (measure.run_op(spec, fn, args, grads, True) for fn in (sdpa, ours, ours))
        case = {"B": B, "H": H, "Nq": nq, "Nk": nk, "D": D, "tensors": {},
                "out_in_BNHD_order": got["out"].transpose(1, 2).is_contiguous()}
        for name, w in want.items():
            g = got[name]
            err, terr, bound = measure.error_and_bound(g, theirs[name], w)
            case["tensors"][name] = {"error": err, "sdpa_error": terr, "bound": bound, "within": err <= bound,
                                     "finite": bool(torch.isfinite(g).all()), "repeatable": torch.equal(g, again[name])}
        case["passed"] = all(t["within"] and t["finite"] and t["repeatable"] for t in case["tensors"].values())
        out["cases"].append(case)
        worst = max(case["tensors"].items(), key=lambda kv: kv[1]["error"] / max(kv[1]["bound"], 1e-30))
        print(f"attention {dtype} B={B} H={H} Nq={nq} Nk={nk} D={D}: {'ok' if case['passed'] else 'FAILED'}; "
              f"worst {worst[0]} error {worst[1]['error']:.3g} vs bound {worst[1]['bound']:.3g}", flush=True)
        save()
        del q, k, v, dout, args, grads, want, theirs, got, again
    shapes = RunShapes.of(vit_config("Micro/4" if smoke else "B/16"), 2 if smoke else 128, str(dtype)[6:],
                          backward=True)
    out["norms"] = {op: measure.check_op(op, shapes, device, mode="triton") for op in ("layer_norm", "add_layer_norm")}
    norms_ok = all("cause" not in r and r["error"] <= r["bound"] for r in out["norms"].values())
    passed = sum(c["passed"] for c in out["cases"])
    out |= {"passed": passed == len(out["cases"]) and norms_ok,
            "summary": f"{passed}/{len(out['cases'])} attention shapes within bound, finite, repeatable; LayerNorm "
                       + ", ".join(f"{op} {r.get('error', float('nan')):.2g} vs {r.get('bound', 0):.2g}"
                                   + (f" ({r['cause']})" if "cause" in r else "") for op, r in out["norms"].items())}


def part_compiled_step(smoke: bool, out: dict, save) -> None:
    torch, device, dtype = _setup(smoke)
    from torch._inductor import config as inductor_config

    from mpp.model.kernel_policy import KernelPolicy, RunShapes, resolve
    from mpp.model.objective import MPPConfig, MPPObjective, corrupted_count
    from mpp.model.ops import TORCH
    from mpp.model.vit import ViT, vit_config

    # Two blocks: a full one and the last (the corrupted patches' queries only): both attention shapes,
    # both LayerNorms, the fused add; compilation is what takes the time here, and it grows with depth.
    config = vit_config("Micro/4" if smoke else "S/16", depth=2, num_classes=0)
    batch = 2 if smoke else 32
    last = corrupted_count(MPPConfig().corrupt_rate, config.num_patches)
    shapes = RunShapes.of(config, batch, str(dtype)[6:], backward=True, last_queries=last)
    choice = resolve(KernelPolicy.from_flags("triton", "off", environ={}), shapes, device)  # a failed check raises
    out |= {"model": "Micro/4 depth 2" if smoke else "S/16 depth 2", "batch": batch, "dtype": str(dtype)[6:],
            "backend": "aot_eager" if smoke else "inductor", "kernels": choice.record(), "losses": {}}
    save()
    inductor_config.fallback_random = True  # compiled random draws as eager's: the same patches corrupted
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, config.image_size, config.image_size, generator=gen, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    initial = None
    for name, kernels in (("torch", TORCH), ("triton", choice.kernels)):
        torch.manual_seed(0)
        objective = MPPObjective(ViT(config, kernels)).to(device)
        initial = initial or {k: v.clone() for k, v in objective.state_dict().items()}
        objective.load_state_dict(initial)  # the same initial weights on both sides
        optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-3)
        compiled = torch.compile(objective, fullgraph=True, backend=out["backend"])
        torch.manual_seed(1)
        started, losses = time.monotonic(), []
        for _ in range(3):
            with autocast():
                loss = compiled(images)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(objective.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out["losses"][name] = losses
        out[f"{name}_seconds"] = time.monotonic() - started  # compilation included
        print(f"compiled step, {name} kernels: losses {losses} ({out[f'{name}_seconds']:.1f} s)", flush=True)
        save()
    # bf16 tolerance: two bf16 ulps of the loss (autocast rounds attention and matmul outputs to bf16).
    tol = 2 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-4
    a, b = out["losses"]["triton"], out["losses"]["torch"]
    out |= {"differences": [x - y for x, y in zip(a, b, strict=True)], "relative_tolerance": tol}
    out["passed"] = all(math.isfinite(x) and math.isfinite(y) and abs(x - y) <= tol * abs(y)
                        for x, y in zip(a, b, strict=True))
    diffs = ", ".join(f"{d:+.2e}" for d in out["differences"])
    out["summary"] = f"loss differences {diffs} (tolerance {tol:.3g} relative)"


PART_FUNCS = {"versions": part_versions, "verdicts": part_verdicts, "tests": part_tests,
              "attention_bf16": part_attention, "compiled_step": part_compiled_step}


def run_part_here(name: str, smoke: bool, result: Path) -> None:
    out: dict = {}
    try:
        PART_FUNCS[name](smoke, out, functools.partial(write_json, result, out))  # save(): the JSON so far
    except BaseException as e:  # the parent reports the part as an error; the JSON says why
        out["exception"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-4000:]
        raise
    finally:
        write_json(result, out)
