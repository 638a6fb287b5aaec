"""No checkpoint may run code (issue #15): every load is weights-only, what the trainer saves survives
that, and a file that needs anything else is refused with one line by every entry point that reads
checkpoints, before its payload could run and before anything is written."""
import os
import pickle
import random
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.runs import run_script

from mpp.core.errors import UsageError
from mpp.eval.probe_setup import checkpoint_step
from mpp.run.checkpoint import (
    BadCheckpoint,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mpp.run.rundir import list_checkpoints

# 2 steps, a checkpoint at each: the smallest run whose checkpoint has every part a long run's has.
RUN = ["--max-steps", "2", "--save-every", "1", "--batch-size", "32", "--num-workers", "0", "--log-every", "1",
       "--warmup-steps", "1"]
SYSTEM = f"{os.system.__module__}.{os.system.__name__}"  # posix.system: the global the payload needs


class Payload:
    """Unpickled, it runs `touch marker`: what a hostile checkpoint does, harmlessly visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One real training run for the whole module (CI time is tight)."""
    out = tmp_path_factory.mktemp("safe-load") / "run"
    done = run_script("scripts/pretrain_mpp.py", "--output-dir", str(out), *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def hostile_checkpoint(real: Path, target: Path, marker: Path) -> Path:
    """A real checkpoint's keys and tensors, with the payload where the RNG states belong."""
    state = load_checkpoint(real)
    state["rng"] = [Payload(marker)]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def small_checkpoint(run_dir: Path, step: int, **extra) -> Path:
    return save_checkpoint(run_dir, step, {"config": {}, "model": {"w": torch.ones(2)}, "step": step, **extra},
                           keep=0)


def draws() -> tuple:
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()


# ---------------------------------------------------------------- what the trainer saves loads weights-only

@pytest.mark.slow
def test_a_training_checkpoint_loads_weights_only(run):
    path = list_checkpoints(run)[-1]
    state = load_checkpoint(path)  # weights_only=True, no fallback exists
    assert {"config", "model", "objective", "optimizer", "scheduler", "step", "elapsed", "rng", "data",
            "scaler"} <= state.keys()
    assert state["step"] == 2 and state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 2
    # Nothing of numpy's is left; the config's TorchVersion (a str) is the one type beyond torch's defaults.
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) <= {"torch.torch_version.TorchVersion"}
    assert load_checkpoint(path, mmap=True)["step"] == 2


@pytest.mark.slow
def test_set_rng_state_restores_every_stream_from_a_checkpoint(run, tmp_path):
    saved = load_checkpoint(list_checkpoints(run)[-1])["rng"][0]
    set_rng_state(saved)
    first = draws()
    set_rng_state(saved)
    assert draws() == first

    np.random.standard_normal()  # numpy now caches the second Box-Muller value: has_gauss = 1
    live = rng_state()
    expected = draws()
    small_checkpoint(tmp_path, 1, rng=[live])
    set_rng_state(load_checkpoint(list_checkpoints(tmp_path)[-1])["rng"][0])
    assert draws() == expected


def test_optimizer_scheduler_scaler_and_finetune_state_load_weights_only(tmp_path):
    """The parts a CPU run leaves out (an fp16 scaler) or builds elsewhere (eval/finetune.py's save)."""
    import dataclasses

    from mpp.train.finetune import FinetuneConfig

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    scheduler.step()
    state = {"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "config": {"finetune": dataclasses.asdict(FinetuneConfig()), "train": {"objective": "finetune"}}}
    loaded = load_checkpoint(small_checkpoint(tmp_path, 1, **state))
    assert loaded["scaler"] == scaler.state_dict() and loaded["scheduler"] == scheduler.state_dict()
    assert loaded["config"]["finetune"] == dataclasses.asdict(FinetuneConfig())
    opt.load_state_dict(loaded["optimizer"])


def test_checkpoints_written_before_the_change_still_load(tmp_path):
    """Older checkpoints hold numpy's RNG tuple (an ndarray): exactly its types are allowed."""
    np.random.standard_normal()
    legacy = {**rng_state(), "numpy": np.random.get_state()}
    expected = draws()
    path = small_checkpoint(tmp_path, 1, rng=[legacy], versions={"torch": torch.__version__})
    set_rng_state(load_checkpoint(path)["rng"][0])
    assert draws() == expected


# ---------------------------------------------------------------- refusals, one line each

def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The hostile file's payload is live: the refusals below are not vacuous."""
    pickle.loads(pickle.dumps(Payload(tmp_path / "MARKER")))  # plain pickle: what weights_only=False does
    assert (tmp_path / "MARKER").exists()


def test_unsafe_torn_and_foreign_files_are_refused_with_one_line(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"step": 1, "rng": [Payload(marker)]}, tmp_path / "hostile.pt")
    good = small_checkpoint(tmp_path / "run", 1)
    (tmp_path / "torn.pt").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")
    for name, kind, says in [("hostile.pt", "unsafe", f"needs the global '{SYSTEM}'"),
                             ("torn.pt", "unreadable", "truncated or corrupted"),
                             ("text.pt", "unreadable", "truncated or corrupted"),
                             ("tensor.pt", "unreadable", "holds a Tensor")]:
        for mmap in (False, True):
            with pytest.raises(BadCheckpoint) as e:
                load_checkpoint(tmp_path / name, mmap=mmap)
            assert e.value.kind == kind and says in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    assert issubclass(BadCheckpoint, UsageError)  # entry points print it as one `error: ` line, exit 2
    assert checkpoint_step(tmp_path / "hostile.pt") == 0  # the step of a renamed file is read weights-only too
    assert not marker.exists()


def test_load_latest_passes_over_an_unsafe_newest_but_refuses_a_run_with_nothing_else(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    small_checkpoint(run, 1)
    torch.save({"step": 2, "rng": [Payload(marker)]}, run / "checkpoints" / "ckpt-00000002.pt")
    skipped = []
    state, path = load_latest(run, skipped=lambda p, e: skipped.append((p.name, e.kind)))
    assert state["step"] == 1 and path.name == "ckpt-00000001.pt" and skipped == [("ckpt-00000002.pt", "unsafe")]

    (run / "checkpoints" / "ckpt-00000001.pt").write_bytes(b"")  # now torn: no usable checkpoint left
    skipped.clear()
    with pytest.raises(BadCheckpoint, match="not a safe checkpoint") as e:
        load_latest(run, skipped=lambda p, e: skipped.append((p.name, e.kind)))
    assert e.value.kind == "unsafe" and skipped == [("ckpt-00000001.pt", "unreadable")]  # raised, not also warned
    (run / "checkpoints" / "ckpt-00000002.pt").write_bytes(b"")
    assert load_latest(run, skipped=lambda p, e: None) is None  # torn only: the callers' "no checkpoint" errors
    assert not marker.exists()


# ---------------------------------------------------------------- through the real command lines

COMMANDS = {  # DIR: a run directory whose only checkpoint is hostile; FILE: that checkpoint; OUT: elsewhere
    "fewshot": ["eval/fewshot.py", "--run", "FILE", "--output", "OUT/fewshot.json"],
    "finetune": ["eval/finetune.py", "--run", "FILE", "--output-dir", "OUT/finetune"],
    "linear_probe": ["eval/linear_probe.py", "--run", "DIR", "--output", "OUT/linear-probe.json"],
    "compare": ["eval/compare.py", "DIR", "--output", "OUT/compare"],
    "pretrain_resume": ["scripts/pretrain_mpp.py", "--resume", "--output-dir", "DIR", *RUN],
}


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_entry_point_refuses_a_hostile_checkpoint(command, run, tmp_path):
    folder, out, marker = tmp_path / "run", tmp_path / "out", tmp_path / "MARKER"
    hostile = hostile_checkpoint(list_checkpoints(run)[-1], folder / "checkpoints" / "ckpt-00000002.pt", marker)
    shutil.copy(run / "config.json", folder / "config.json")
    before = files_in(folder)
    places = {"DIR": str(folder), "FILE": str(hostile), "OUT": str(out)}
    args = [places.get(a, a.replace("OUT", str(out))) for a in COMMANDS[command]]

    done = run_script(*args, timeout=180)

    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"'{hostile}' is not a safe checkpoint" in errors[0] and f"'{SYSTEM}'" in errors[0], errors
    assert not marker.exists(), "the checkpoint's payload ran"
    after = files_in(folder)
    assert {name: after.get(name) for name in before} == before, "a file of the run directory changed"
    assert not (out.is_dir() and files_in(out)), f"wrote {list(files_in(out))}"
