"""Sharded launches (FSDP, DeepSpeed) are refused at start with one line, before anything is written.

`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP=true for the processes it starts; on this
CPU-only machine it always goes through torchrun, whose own traceback follows a failed child, so the
refusal is tested where mpp decides it: the variable set on a plain run of each entry point."""
import pytest
from helpers.runs import FAST, run_script

from mpp.core.errors import UsageError
from mpp.run.runtime import refuse_sharding


@pytest.mark.parametrize("name, flag", [("ACCELERATE_USE_FSDP", "--use_fsdp"),
                                        ("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed")])
def test_refuse_sharding_names_the_flag(name, flag):
    with pytest.raises(UsageError, match=f"accelerate launch {flag} is not supported.*--multi_gpu"):
        refuse_sharding({name: "true"})
    refuse_sharding({name: "false"})  # what launch sets without the flag: accepted
    refuse_sharding({})


@pytest.mark.parametrize("script, args", [
    ("scripts/pretrain_mpp.py", [*FAST, "--max-steps", "4"]),
    ("eval/finetune.py", ["--model", "Micro/4", "--steps", "2", "--batch-size", "32", "--num-workers", "0",
                          "--lrs", "0.01", "--seeds", "1"]),
])
def test_fsdp_launch_is_refused_before_anything_is_written(tmp_path, monkeypatch, script, args):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # run_script passes this process's environment on
    out = tmp_path / "run"
    done = run_script(script, "--output-dir", str(out), *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: accelerate launch --use_fsdp is not supported"), lines
    assert "Traceback" not in done.stderr
    assert not out.exists()
