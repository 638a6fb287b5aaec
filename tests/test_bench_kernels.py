"""scripts/bench_kernels.py: says so and exits 0 without a GPU; its --smoke run covers every code path;
a --time-limit it has passed records the cases it did not start."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_gpu_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--smoke", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"device", "torch", "triton", "commit", "ceilings", "layer_norm", "attention"} <= set(result)
    assert result["complete"] is True
    # CPU: PyTorch's ops compiled through dynamo and AOT autograd, not Inductor's C++ (see bench_kernels' docstring)
    assert result["compile_backend"] == "aot_eager"
    assert {(r["op"], r["impl"]) for r in result["layer_norm"]} == {  # against eager and compiled PyTorch
        (op, impl) for op in ("layer_norm", "add_layer_norm") for impl in ("triton", "torch", "torch-compile")}
    impls = {r["impl"] for r in result["attention"]}
    assert {"triton", "sdpa-math"} <= impls
    assert all(r["layout"] == "vit" for r in result["attention"])
    assert not [r for r in result["attention"] + result["layer_norm"] if r["impl"] == "triton" and "error" in r]
    for r in result["layer_norm"] + [r for r in result["attention"] if "error" not in r]:
        assert all(r[f"{k}_ms"] > 0 for k in ("fwd", "bwd", "fwd+bwd"))
        if r["impl"] != "triton":  # every other implementation's row carries ours / its time
            assert set(r["ours_over_this"]) == {"fwd", "bwd", "fwd+bwd"}
            assert r["ours_over_this"]["fwd"] == pytest.approx(
                next(o for o in result[r["op"] if r["op"] == "attention" else "layer_norm"]
                     if o["op"] == r["op"] and o["impl"] == "triton")["fwd_ms"] / r["fwd_ms"])
    assert "ours/this" in proc.stdout


@pytest.mark.slow
def test_a_passed_time_limit_skips_the_rest_and_says_so(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--smoke", "--time-limit", "0.001",
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["complete"] is False
    assert all(r["skipped"] == "time limit" for r in result["attention"] + result["layer_norm"])
