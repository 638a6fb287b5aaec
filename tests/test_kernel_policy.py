"""The kernel policy (mpp/model/kernel_policy.py): decided once, verified and timed, cached, shared by all processes.

Faults are injected into the table the verification and the model both read (`mpp.model.ops.IMPLEMENTATIONS`):
a kernel that gives wrong numbers, raises at launch, returns NaN or is slower. Without a GPU the
kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), which is where
`auto` measures on this machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import launch_2

from mpp.core.errors import UsageError
from mpp.model import kernel_cache, kernel_measure
from mpp.model import kernel_policy as kernels
from mpp.model.kernel_policy import KernelPolicy, RunShapes, resolve
from mpp.model.ops import IMPLEMENTATIONS, TORCH, Kernels, torch_layer_norm
from mpp.model.vit import ViT, vit_config
from triton_kernels import gate

REPO = Path(__file__).resolve().parents[1]
SHAPES = RunShapes(batch=2, tokens=17, last_queries=9, heads=2, head_dim=32, width=64)
ONLY_LN = frozenset({"attention", "add_layer_norm"})  # the others kept on PyTorch: one op measured, fast

pytestmark = pytest.mark.skipif(not gate.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU) to measure kernels")


def policy(mode="auto", off=ONLY_LN, cache="off"):
    return KernelPolicy(mode, off, str(cache))


def slowed(fn, seconds=0.05):
    def slow(*args):
        time.sleep(seconds)
        return fn(*args)
    return slow


@pytest.fixture
def fast_ours(monkeypatch):
    """Our LayerNorm correct and PyTorch's made slower: a verdict that should pick ours."""
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", torch_layer_norm)
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "torch", slowed(torch_layer_norm))


def verdict(choice, op="layer_norm"):
    return next(v for v in choice.verdicts if v.op == op)


def test_policy_from_flags_and_environment():
    assert KernelPolicy.from_flags("", environ={}) == KernelPolicy("auto")
    assert KernelPolicy.from_flags("", environ={"MPP_KERNELS": "torch"}).mode == "torch"
    assert KernelPolicy.from_flags("triton", environ={"MPP_KERNELS": "torch"}).mode == "triton"  # the flag wins
    off = KernelPolicy.from_flags("", environ={"MPP_KERNELS_OFF": "add_layer_norm, attention"}).off
    assert off == {"add_layer_norm", "attention"}
    assert KernelPolicy.from_flags("", "off", environ={}).cache_dir() is None
    assert KernelPolicy.from_flags("", environ={"MPP_KERNEL_CACHE": "/x/y"}).cache_dir() == Path("/x/y")
    with pytest.raises(UsageError, match="not one of auto, triton, torch"):
        KernelPolicy.from_flags("fast", environ={})
    with pytest.raises(UsageError, match="not ops"):
        KernelPolicy.from_flags("", environ={"MPP_KERNELS_OFF": "softmax"})


def test_torch_mode_measures_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "measure_op", lambda *a, **k: pytest.fail("--kernels torch measured"))
    choice = resolve(policy("torch", off=frozenset()), SHAPES, "cpu")
    assert choice.kernels == TORCH and choice.source == "not measured"


def test_correct_and_faster_kernel_is_chosen(fast_ours):
    choice = resolve(policy(), SHAPES, "cpu")
    v = verdict(choice)
    assert v.impl == "triton" and v.reason == "verified and faster", v
    assert v.figures["ratio"] < 1 and v.figures["error"] <= v.figures["bound"]
    assert choice.kernels == Kernels(layer_norm="triton")
    assert verdict(choice, "attention").reason == "MPP_KERNELS_OFF names it"
    assert any("layer_norm → triton: verified and faster (ours" in line for line in choice.lines())
    record = choice.record()["verdicts"]["layer_norm"]
    assert {"impl", "reason", "error", "bound", "ours_ms", "torch_ms", "ratio"} <= set(record)
    json.dumps(choice.record())  # written into config.json as is


def test_slower_kernel_is_not_chosen(monkeypatch):
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", slowed(torch_layer_norm))
    v = verdict(resolve(policy(), SHAPES, "cpu"))
    assert v.impl == "torch" and "not faster" in v.reason and v.figures["ratio"] > 1
    # forced, it runs anyway: --kernels triton checks the numbers, not the speed
    assert verdict(resolve(policy("triton"), SHAPES, "cpu")).impl == "triton"


@pytest.mark.parametrize("fault, cause", [
    (lambda x, w, b, eps: torch_layer_norm(x, w, b, eps) * 1.001, "wrong numbers: "),
    (lambda x, w, b, eps: torch_layer_norm(x, w, b, eps) + float("nan"), "non-finite y"),
    (lambda x, w, b, eps: (_ for _ in ()).throw(RuntimeError("out of resource: shared memory, Required: 300000")),
     "RuntimeError at the run's shapes: out of resource: shared memory"),
])
def test_failing_kernel_falls_back_with_one_warning_and_is_an_error_when_forced(monkeypatch, fault, cause):
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", fault)
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "torch", slowed(torch_layer_norm))  # speed cannot save it
    warnings = []
    v = verdict(resolve(policy(), SHAPES, "cpu", warn=warnings.append))
    assert v.impl == "torch" and v.reason.startswith(cause), v
    assert len(warnings) == 1 and warnings[0].startswith("warning: kernels: layer_norm falls back to PyTorch: " + cause)
    with pytest.raises(UsageError, match="--kernels triton, but our layer_norm kernel failed its check"):
        resolve(policy("triton"), SHAPES, "cpu")


def test_a_wrong_gradient_is_caught(monkeypatch):
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            return torch_layer_norm(x, w, b, 1e-6)

        @staticmethod
        def backward(ctx, dy):  # plausible, finite, wrong
            return dy, dy.sum(tuple(range(dy.dim() - 1))), dy.sum(tuple(range(dy.dim() - 1)))

    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", lambda x, w, b, eps: WrongGrad.apply(x, w, b))
    v = verdict(resolve(policy(), SHAPES, "cpu", warn=lambda _: None))
    assert v.impl == "torch" and v.reason.startswith("wrong numbers: d"), v


def test_the_real_kernels_are_verified_at_the_run_shapes():
    """Under the interpreter ours are exact but far slower: verified, then PyTorch's by the timing."""
    choice = resolve(policy(off=frozenset()), SHAPES, "cpu")
    for v in choice.verdicts:
        assert v.figures["error"] <= v.figures["bound"], v
        assert v.impl == "torch" and v.reason == "verified, but not faster than PyTorch's", v
    forced = resolve(policy("triton", off=frozenset()), SHAPES, "cpu")
    assert forced.kernels == Kernels("triton", "triton", "triton")


def test_shapes_the_kernel_is_not_tried_at(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine
    cuda = torch.device("cuda")
    fp32 = RunShapes(8, 197, 197, 12, 64, 768, "float32")
    assert "no tensor cores" in kernels._static_problem("attention", fp32, cuda, "auto")
    assert kernels._static_problem("attention", fp32, cuda, "triton") is None  # forced: measured, then used
    assert kernels._static_problem("attention", RunShapes(8, 197, 197, 12, 64, 768, "bfloat16"), cuda, "auto") is None
    dropout = RunShapes(8, 197, 197, 12, 64, 768, "bfloat16", attn_dropout=0.1)
    assert "dropout" in kernels._static_problem("attention", dropout, cuda, "auto")
    assert "grid limit" in kernels._static_problem("attention", RunShapes(6000, 197, 197, 12, 64, 768), cuda, "auto")
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "ROCm GPUs are not supported" in gate.platform_problem(cuda)


def test_padded_head_dim_is_timed_not_assumed(monkeypatch):
    from mpp.model.ops import torch_attention

    monkeypatch.setitem(IMPLEMENTATIONS["attention"], "triton", torch_attention)
    monkeypatch.setitem(IMPLEMENTATIONS["attention"], "torch", slowed(torch_attention))
    h80 = RunShapes(batch=1, tokens=9, last_queries=1, heads=2, head_dim=80, width=160)
    v = verdict(resolve(policy(off=frozenset({"layer_norm", "add_layer_norm"})), h80, "cpu"), "attention")
    assert v.impl == "triton" and "padded head dim, timed" in v.reason


def test_cache_hits_misses_and_is_invalidated(monkeypatch, tmp_path, fast_ours):
    calls = []
    measure = kernels.measure_op
    monkeypatch.setattr(kernels, "measure_op", lambda *a, **k: calls.append(a[0]) or measure(*a, **k))
    p = policy(cache=tmp_path)
    first = resolve(p, SHAPES, "cpu")
    assert first.source == "measured" and calls == ["layer_norm"] and len(list(tmp_path.glob("*.json"))) == 1
    again = resolve(p, SHAPES, "cpu")
    assert again.source == "cache" and calls == ["layer_norm"] and again.record() == {**first.record(),
                                                                                        "source": "cache"}
    # other shapes, a new torch, an edited kernel: each measures again
    resolve(p, RunShapes(**{**SHAPES.__dict__, "batch": 3}), "cpu")
    assert calls == ["layer_norm"] * 2
    monkeypatch.setattr(torch, "__version__", "99.0")
    resolve(p, SHAPES, "cpu")
    assert calls == ["layer_norm"] * 3
    monkeypatch.setattr(kernel_cache, "source_hash", lambda: "edited")
    resolve(p, SHAPES, "cpu")
    assert calls == ["layer_norm"] * 4
    assert resolve(p, SHAPES, "cpu").source == "cache" and calls == ["layer_norm"] * 4
    # a torn entry is a miss, rewritten; the cache switched off writes nothing
    for entry in tmp_path.glob("*.json"):
        entry.write_text(entry.read_text()[:20])
    assert resolve(p, SHAPES, "cpu").source == "measured"
    assert resolve(p, SHAPES, "cpu").source == "cache"
    off = tmp_path / "never"
    resolve(policy(cache="off"), SHAPES, "cpu")
    assert not off.exists()


def test_source_hash_covers_the_kernels_and_the_verification():
    assert kernel_cache.source_hash() == kernel_cache.source_hash() and len(kernel_cache.source_hash()) == 16
    env = kernel_cache.environment(torch.device("cpu"))
    assert env["device"] == "cpu (Triton interpreter)" and env["kernel_sources"] == kernel_cache.source_hash()
    assert env["torch"] == torch.__version__ and env["triton"] != "none"


def test_the_model_runs_the_functions_it_was_built_with(monkeypatch):
    """No dispatch per call: the ViT keeps what it was given; changing the table later changes nothing."""
    vit = ViT(vit_config("Micro/4", depth=1), Kernels(layer_norm="triton"))
    assert vit.norm._norm is IMPLEMENTATIONS["layer_norm"]["triton"] and vit.blocks[0].attn._attention is \
        IMPLEMENTATIONS["attention"]["torch"]
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", lambda *a: pytest.fail("looked up again"))
    vit(torch.rand(2, 3, 16, 16))


def test_processes_run_the_main_process_verdict(tmp_path):
    """2 processes (gloo): the main one measures and broadcasts. Process 1's own kernel gives wrong
    numbers, so a verdict it measured itself would differ; both run the main process's."""
    script = tmp_path / "share.py"
    script.write_text(SHARE_SCRIPT)
    done = launch_2(str(script), str(tmp_path))  # TRITON_INTERPRET=1 comes from conftest.py's environment
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert verdicts[0] == verdicts[1] and verdicts[0]["layer_norm"] == "triton", verdicts
    assert done.stdout.count("kernels: layer_norm → triton") == 1  # said once, by the main process


SHARE_SCRIPT = r'''
import json, sys, time
from pathlib import Path
from accelerate import PartialState
from mpp.model.kernel_policy import KernelPolicy, RunShapes
from mpp.model.ops import IMPLEMENTATIONS, torch_layer_norm
from mpp.run.runtime import choose_kernels

state = PartialState(cpu=True)
def slow(*a):
    time.sleep(0.05)
    return torch_layer_norm(*a)
IMPLEMENTATIONS["layer_norm"]["triton"] = torch_layer_norm
IMPLEMENTATIONS["layer_norm"]["torch"] = slow
if state.process_index == 1:  # this process's kernel is wrong: measured here, it would be refused
    IMPLEMENTATIONS["layer_norm"]["triton"] = lambda *a: torch_layer_norm(*a) * 2
policy = KernelPolicy("auto", frozenset({"attention", "add_layer_norm"}), "off")
shapes = RunShapes(batch=2, tokens=17, last_queries=9, heads=2, head_dim=32, width=64)
choice = choose_kernels(policy, shapes, "cpu", state)
Path(sys.argv[1], f"rank{state.process_index}.json").write_text(json.dumps(choice.kernels.names()))
state.wait_for_everyone()  # neither leaves the group while the other still talks to it
state.destroy_process_group()
'''


def test_kernels_torch_never_imports_triton(tmp_path):
    """With triton unimportable (as a broken install), --kernels torch trains and imports none of our
    kernels; auto falls back with one warning on a platform that could run them."""
    prelude = ("import sys, runpy; sys.modules['triton'] = None; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    common = ["scripts/pretrain_mpp.py", "--max-steps", "2", "--batch-size", "8", "--num-workers", "0",
              "--kernel-cache", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("MPP_KERNELS", None)
    check = ("import atexit, sys; atexit.register(lambda: print('LOADED', sorted(m for m in sys.modules "
             "if m in ('triton_kernels.attention', 'triton_kernels.layer_norm', 'triton') and sys.modules[m])))")
    for mode in ("torch", "auto"):
        out = tmp_path / mode
        done = subprocess.run([sys.executable, "-c", check + "; " + prelude, *common, "--kernels", mode,
                               "--output-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((out / "config.json").read_text())["kernels"]
        assert {v["impl"] for v in record["verdicts"].values()} == {"torch"}
        if mode == "torch":
            assert "LOADED []" in done.stdout and "warning" not in done.stderr
        else:
            assert done.stderr.count("warning: kernels:") == 1, done.stderr
            assert "add_layer_norm fall back to PyTorch: triton is not installed" in done.stderr, done.stderr


def test_a_failure_outside_our_kernel_is_not_a_verdict_on_it(monkeypatch, tmp_path, fast_ours):
    """PyTorch's op (or the reference) running out of memory says nothing about ours: PyTorch's op
    this time, with the reason, and measured again next time instead of cached."""
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "torch", oom)
    warnings = []
    v = verdict(resolve(policy(cache=tmp_path), SHAPES, "cpu", warn=warnings.append))
    assert v.impl == "torch" and v.reason.startswith("could not be verified: the reference or PyTorch's op failed "
                                                     "(OutOfMemoryError: CUDA out of memory"), v
    assert len(warnings) == 1
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "torch", slowed(torch_layer_norm))
    again = resolve(policy(cache=tmp_path), SHAPES, "cpu")
    assert again.source == "measured" and verdict(again).impl == "triton"


def test_a_measurement_that_never_finished_is_remembered(monkeypatch, tmp_path, fast_ours):
    """A kernel that kills the process while it is measured (a hang, an illegal address) must not do it
    again at every start: the cache remembers the unfinished measurement."""
    class Killed(BaseException):
        """As a kill ends the process: nothing of the measurement's own after this line runs."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def crash(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(kernels, "measure_op", interrupted)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is the user's, not the kernel's: nothing remembered
        resolve(policy(cache=tmp_path), SHAPES, "cpu")
    assert all(json.loads(f.read_text())["measurements"] == {} for f in tmp_path.glob("*.json"))
    monkeypatch.setattr(kernels, "measure_op", crash)
    shared = []
    with pytest.raises(Killed):  # re-raised on the main process once the others were told
        resolve(policy(cache=tmp_path), SHAPES, "cpu", share=lambda x: shared.append(x) or x)
    assert shared[0]["error"].startswith("the main process failed to choose kernels")
    monkeypatch.undo()
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", torch_layer_norm)
    warnings = []
    v = verdict(resolve(policy(cache=tmp_path), SHAPES, "cpu", warn=warnings.append))
    assert v.impl == "torch" and v.reason == kernels.UNFINISHED and "did not finish" in warnings[0]
    assert verdict(resolve(policy(cache="off"), SHAPES, "cpu")).figures  # --kernel-cache off measures again


def test_a_kernel_that_breaks_the_cuda_context_stops_the_run(monkeypatch):
    """An illegal memory access cannot be survived in-process: not a fallback but one clear error."""
    def broken(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    with pytest.raises(kernel_measure.BrokenContext, match="illegal memory access"):
        kernel_measure._ours(torch.device("cuda"), broken)
    assert kernel_measure._ours(torch.device("cpu"), broken).startswith("RuntimeError at the run's shapes")


def test_the_error_bound_is_twice_pytorchs_in_half_precision_and_a_few_ulps_in_fp32():
    want = torch.linspace(-2, 2, 1000, dtype=torch.float64)
    ulp = torch.finfo(torch.float32).eps * 2  # one fp32 ulp at |want| = 2
    near = (want + 0.25 * ulp).float()  # PyTorch: its largest error 1/4 ulp
    # fp32: 7 ulps where PyTorch has 1/4 (the chance of two maxima, as at Micro/4's dv) is within...
    err, terr, bound = kernel_measure.error_and_bound((want + 7 * ulp).float(), near, want)
    assert err > 2 * terr + ulp and err <= bound == pytest.approx(kernel_measure.FP32_TOLERANCE * 2)
    # ...tf32 products (10 mantissa bits) or a wrong element are not
    assert kernel_measure.error_and_bound((want * (1 + 2**-11)).float(), near, want)[0] > bound
    # bf16: twice PyTorch's error plus one bf16 ulp, nothing looser
    rounded = want.bfloat16()
    err, terr, bound = kernel_measure.error_and_bound(rounded, rounded, want)
    assert bound == pytest.approx(2 * terr + torch.finfo(torch.bfloat16).eps * 2)


def wrong_layer_norm(x, w, b, eps):
    return torch_layer_norm(x, w, b, eps) * 1.001


def test_a_cached_verdict_spares_the_timing_but_never_admits_a_kernel(monkeypatch, tmp_path, fast_ours):
    """An entry hand-edited to call a kernel with wrong numbers verified and faster (its huge error left
    in) does not put it in: the check runs again on every start, only the timing comes from the cache."""
    p = policy(cache=tmp_path)
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", wrong_layer_norm)
    assert verdict(resolve(p, SHAPES, "cpu", warn=lambda _: None)).reason.startswith("wrong numbers")
    entry = next(tmp_path.glob("*.json"))
    record = json.loads(entry.read_text())
    measured = record["measurements"]["layer_norm"]
    assert measured["error"] > measured["bound"]
    forged = {**{k: measured[k] for k in ("error", "bound", "worst")}, "ours_ms": 1.0, "torch_ms": 2.0, "ratio": 0.5}
    entry.write_text(json.dumps({**record, "measurements": {"layer_norm": forged}}))
    timed = []
    monkeypatch.setattr(kernels, "measure_op", lambda *a, **k: timed.append(a[0]))
    warnings = []
    v = verdict(resolve(p, SHAPES, "cpu", warn=warnings.append))
    assert v.impl == "torch" and v.reason.startswith("wrong numbers") and len(warnings) == 1, (v, warnings)
    assert "cause" in json.loads(entry.read_text())["measurements"]["layer_norm"]  # the entry says so again
    with pytest.raises(UsageError, match="--kernels triton, but our layer_norm kernel failed its check"):
        resolve(policy("triton", cache=tmp_path), SHAPES, "cpu")
    # A kernel that is right, cached as faster: used on the cache's timing and today's check.
    monkeypatch.setitem(IMPLEMENTATIONS["layer_norm"], "triton", torch_layer_norm)
    entry.write_text(json.dumps({**record, "measurements": {"layer_norm": forged}}))
    choice = resolve(p, SHAPES, "cpu")
    v = verdict(choice)
    assert choice.source == "cache" and v.impl == "triton" and v.figures["ratio"] == 0.5, v
    assert v.figures["error"] <= v.figures["bound"] and not timed


MALFORMED = {  # a cache entry's measurements → what the warning says is wrong with them
    "text-error": ({"layer_norm": {"error": "big", "bound": 1e-4, "worst": "y", "ours_ms": 1, "torch_ms": 2,
                                   "ratio": 0.5}}, "error 'big' is not a number"),
    "nan-ratio": ({"layer_norm": {"error": 0, "bound": 1e-4, "worst": "y", "ours_ms": 1, "torch_ms": 2,
                                  "ratio": float("nan")}}, "ratio nan is not finite"),
    "timings-only": ({"layer_norm": {"ours_ms": 1, "torch_ms": 2, "ratio": 0.5}}, "neither a cause nor"),
    "half-timings": ({"layer_norm": {"error": 0, "bound": 1e-4, "worst": "y", "ratio": 0.5}}, "but not all"),
    "cause-number": ({"layer_norm": {"cause": 3}}, "cause 3 is not a sentence"),
    "not-an-op": ({"softmax": {"cause": "x"}}, "'softmax' is not an op"),
    "list": ([], "measurements is a list"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_cache_entry_is_measured_again_with_one_warning(monkeypatch, tmp_path, fast_ours, case):
    p = policy(cache=tmp_path)
    resolve(p, SHAPES, "cpu")
    entry = next(tmp_path.glob("*.json"))
    measurements, says = MALFORMED[case]
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "measurements": measurements}))
    calls, warnings = [], []
    measure = kernels.measure_op
    monkeypatch.setattr(kernels, "measure_op", lambda *a, **k: calls.append(a[0]) or measure(*a, **k))
    choice = resolve(p, SHAPES, "cpu", warn=warnings.append)
    assert choice.source == "measured" and calls == ["layer_norm"] and verdict(choice).impl == "triton"
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: kernels: ignoring the verdict cache entry {entry}")
    assert says in warnings[0], warnings[0]
    assert kernel_cache.entry_problem(json.loads(entry.read_text())["measurements"]) is None  # rewritten whole


@pytest.mark.slow
def test_a_malformed_cache_entry_through_the_command_line(tmp_path):
    """A probe (eval/fewshot.py) whose verdict cache holds a hand-edited entry for its shapes: one warning
    line, the op measured again, the run goes on and the entry is rewritten (it was a traceback)."""
    from dataclasses import asdict

    shapes = RunShapes.of(vit_config("Micro/4"), 16, "float32", backward=False)  # what the probe decides at
    key = {"environment": kernel_cache.environment(torch.device("cpu")), "shapes": asdict(shapes)}
    entry = kernel_cache.cache_file(tmp_path / "cache", key)
    entry.parent.mkdir()
    entry.write_text(json.dumps({"key": key, "measurements": {"layer_norm": {"ratio": "fast"}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "MPP_KERNELS_OFF": "attention,add_layer_norm"}
    done = subprocess.run([sys.executable, "eval/fewshot.py", "--model", "Micro/4", "--random-init", "--dataset",
                           "digits", "--shots", "1", "--seeds", "1", "--max-test", "20", "--no-references",
                           "--batch-size", "16", "--kernels", "auto", "--kernel-cache", str(tmp_path / "cache"),
                           "--output", str(tmp_path / "fewshot.json")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "ignoring the verdict cache entry" in warnings[0], done.stderr[-3000:]
    assert "ratio 'fast' is not a number" in warnings[0]
    assert kernel_cache.entry_problem(json.loads(entry.read_text())["measurements"]) is None
