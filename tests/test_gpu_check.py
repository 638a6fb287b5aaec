"""scripts/gpu_check.py: its CPU --smoke run records every part in one JSON and a log; the budget cuts
parts and the JSON still says what happened; its pytest recorder fails a slow test and goes on."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
PARTS = ["versions", "attention_bf16", "train_b16", "train_s16", "kernel_timings", "verdicts", "compiled_step", "tests"]
CPU_PARTS = ["versions", "attention_bf16", "kernel_timings", "verdicts", "compiled_step", "tests"]
ENV = {**os.environ, "TRITON_INTERPRET": "1"}


def check(tmp_path, *args, timeout=300):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--output-dir", str(tmp_path / "results"), *args],
                          cwd=REPO, env={**ENV, "OUT": str(out)}, capture_output=True, text=True, timeout=timeout,
                          check=False)
    record = json.loads((tmp_path / "results" / "gpu-check-smoke-cpu.json").read_text())
    return proc, record, out


@pytest.mark.slow
def test_smoke_run_records_every_part(tmp_path):
    proc, r, out = check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert r["mode"] == "smoke" and r["passed"] is True and list(r["parts"]) == PARTS
    parts = r["parts"]
    for name in CPU_PARTS:  # the parts that run on CPU ran, and passed
        assert parts[name]["status"] == "passed", (name, parts[name])
        assert parts[name]["seconds"] <= parts[name]["limit_s"]
    for name in ("train_b16", "train_s16"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("needs CUDA")

    assert {"torch", "triton", "timm", "cuda"} <= set(parts["versions"]["result"]["versions"])
    versions = parts["verdicts"]["result"]  # measured in a part of their own, after the training A/B
    assert set(versions["verdicts"]) == {"Micro/4 mpp", "Micro/4 supervised"}
    for verdicts in versions["verdicts"].values():
        assert verdicts["mode"] == "auto" and verdicts["source"] == "measured"  # cache off: measured here
        assert set(verdicts["verdicts"]) == {"attention", "layer_norm", "add_layer_norm"}
        assert all("ratio" in v for v in verdicts["verdicts"].values())  # the interpreter ran both and timed them
    assert versions["verdicts"]["Micro/4 mpp"]["shapes"]["last_queries"] == 8  # half of the 16 patches

    tests = parts["tests"]["result"]
    assert tests["counts"].get("passed", 0) >= 2 and not tests["failures"] and tests["exit_code"] == 0
    assert all(t["outcome"] == "passed" and t["seconds"] >= 0 for t in tests["tests"].values())

    norms = parts["attention_bf16"]["result"]["norms"]  # the LayerNorm kernels at the same model's shapes
    assert set(norms) == {"layer_norm", "add_layer_norm"} and all(r["error"] <= r["bound"] for r in norms.values())
    cases = parts["attention_bf16"]["result"]["cases"]
    assert [c["Nq"] == c["Nk"] for c in cases] == [True, True, False, False]
    for case in cases:
        assert set(case["tensors"]) == {"out", "dq", "dk", "dv"}
        assert all(t["within"] and t["finite"] and t["repeatable"] for t in case["tensors"].values())

    timings = parts["kernel_timings"]["result"]
    assert {r["impl"] for r in timings["attention"]} >= {"triton", "sdpa-math"}
    assert {(r["op"], r["impl"]) for r in timings["layer_norm"]} == {
        (op, impl) for op in ("layer_norm", "add_layer_norm") for impl in ("triton", "torch", "torch-compile")}
    assert any("ours_over_this" in r for r in timings["attention"])

    step = parts["compiled_step"]["result"]
    assert len(step["losses"]["torch"]) == len(step["losses"]["triton"]) == len(step["differences"]) == 3
    assert all(v["impl"] == "triton" for v in step["kernels"]["verdicts"].values())  # policy triton: ours ran

    log = (tmp_path / "results" / "gpu-check-smoke-cpu.log").read_text()
    assert "== versions" in log and "overall: PASSED" in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check-smoke-cpu.json", "gpu-check-smoke-cpu.log"]
    assert "overall: PASSED" in proc.stdout


def test_the_budget_cuts_parts_and_the_json_says_so(tmp_path):
    # 4 s of budget, 2 s kept back: the first part (versions: importing torch, no measurement) may end
    # within its 2 s or be killed; the second (interpreted kernels take longer) cannot finish; every later
    # part is skipped, and the JSON and log record it all.
    proc, r, out = check(tmp_path, "--budget", "4", timeout=120)
    assert proc.returncode == 1
    assert list(r["parts"]) == PARTS and r["passed"] is False
    assert r["parts"]["versions"]["status"] in ("passed", "timeout")
    assert r["parts"]["attention_bf16"]["status"] in ("skipped", "timeout")
    for name in CPU_PARTS[2:]:
        assert r["parts"][name]["status"] == "skipped" and r["parts"][name]["reason"].startswith("budget")
    assert (out / "gpu-check-smoke-cpu.json").is_file() and (out / "gpu-check-smoke-cpu.log").is_file()
    assert "NOT PASSED" in proc.stdout


RECORDED = """
import json, sys
sys.path.insert(0, {scripts!r})
import pytest
from gpu_check import TestRecorder
out = {{}}
recorder = TestRecorder(out, lambda: None, 1.0, True)
code = pytest.main(["-q", "-p", "no:cacheprovider", {test_file!r}], plugins=[recorder])
print(json.dumps({{"code": int(code), "tests": out["tests"]}}))
"""


def test_the_recorder_fails_a_slow_test_and_runs_the_rest(tmp_path):
    test_file = tmp_path / "test_some.py"
    test_file.write_text(textwrap.dedent("""
        import time, pytest
        def test_slow():
            time.sleep(30)
        def test_after_the_slow_one():
            pass
        def test_wrong():
            assert 1 + 1 == 3
        def test_skipped():
            pytest.skip("not here")
    """))
    code = RECORDED.format(scripts=str(REPO / "scripts"), test_file=str(test_file))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tests = {name.split("::")[-1]: t for name, t in result["tests"].items()}
    assert result["code"] == 1
    assert tests["test_slow"]["outcome"] == "failed" and "per-test limit of 1 s" in tests["test_slow"]["message"]
    assert tests["test_slow"]["seconds"] < 10
    assert tests["test_after_the_slow_one"]["outcome"] == "passed"
    assert tests["test_wrong"]["outcome"] == "failed" and "assert" in tests["test_wrong"]["message"]
    assert tests["test_skipped"]["outcome"] == "skipped" and "not here" in tests["test_skipped"]["reason"]


def test_the_plan_puts_the_b16_training_ab_within_the_first_three_parts_and_its_limits_in_the_budget():
    done = subprocess.run([sys.executable, str(SCRIPT), "--plan"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)  # no GPU, no torch import needed
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == PARTS and rows.index(next(r for r in rows if r[0] == "train_b16")) < 3
    ends = {r[0]: float(r[2]) for r in rows}
    assert ends["train_b16"] <= 480 - 2 and all(e <= 478 for e in ends.values())
    assert all(r[3] == "must" for r in rows[:3]) and all(r[3] == "best" for r in rows[3:])


def test_a_tree_sent_without_git_records_the_commit_it_was_sent_as(tmp_path):
    from mpp.core.provenance import git_commit

    assert git_commit(tmp_path) == "unknown"  # no .git, no COMMIT: nothing to record
    (tmp_path / "COMMIT").write_text("0123456789abcdef0123456789abcdef01234567\n")
    assert git_commit(tmp_path) == "0123456 (sent)"
    assert git_commit(tmp_path, short=False) == "0123456789abcdef0123456789abcdef01234567 (sent)"
    (tmp_path / "COMMIT").write_text("not a hash; rm -rf /")
    assert git_commit(tmp_path) == "unknown"


def test_bench_train_weighs_kernels_against_compiled_pytorch_under_compile(monkeypatch):
    # The verdicts under --compile were measured against eager PyTorch (run_shapes never passed
    # `compiled`), so `auto` could put our LayerNorm where Inductor would have fused PyTorch's.
    import mpp.bench.cases as bench
    from mpp.model.vit import vit_config

    seen = []
    monkeypatch.setattr(bench, "resolve", lambda policy, shapes, device: seen.append(shapes) or _Choice())
    bench.choose_kernels(None, vit_config("Micro/4"), 2, __import__("torch").float32, None, compiled=True)
    assert seen and all(s.compiled for s in seen)
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_train

    calls = []
    monkeypatch.setattr(bench_train, "choose_kernels", lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(
        SystemExit(0)))
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--model", "Micro/4", "--compile", "--loader-batches", "0"])
    with pytest.raises(SystemExit):
        bench_train.main()
    assert calls == [{"compiled": True}]


class _Choice:
    def lines(self):
        return []
