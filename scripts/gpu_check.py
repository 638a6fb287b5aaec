"""The GPU check: one run of at most `--budget` seconds (8 minutes) into one JSON and one log.

    bash scripts/gpu_check.sh                          # on a lent GPU machine: PYTHONPATH=repo, 8 minutes
    python scripts/gpu_check.py --only tests,attention_bf16    # some parts again, with the whole budget
    TRITON_INTERPRET=1 python scripts/gpu_check.py --smoke --output-dir /tmp/x   # CPU: the script runs

Parts, the answer first (`--plan` prints them with their limits), each in its own process with its own
time limit, so that a hung kernel, an illegal memory access or a timeout ends that part alone; the
JSON is rewritten after every part, so a run killed from outside keeps what was done:
  1 versions        torch, triton, timm, CUDA, driver, the GPU (no measurement)
  2 attention_bf16  attention in the ViT's memory layout, bf16: output and dq, dk, dv against an fp32
                    reference (≤ 2× SDPA's bf16 error + 1 ulp), finite, repeatable; both LayerNorms at B/16
  3 train_b16       scripts/bench_train.py B/16 MPP bf16 --compile, the performance question: timm (SDPA)
                    against ours on PyTorch's ops, with every kernel forced, and with the LayerNorm
                    kernels off; MFU, peak memory, top ops; then, best effort in the time left:
  4 train_s16       the same at S/16
  5 kernel_timings  scripts/bench_kernels.py --quick: ours against every SDPA backend, eager and compiled
  6 verdicts        `resolve`'s verdicts (policy auto, cache off) at S/16 and B/16 training shapes, batch 128 bf16
  7 compiled_step   an MPP step of a 2-block S/16, torch.compile(fullgraph=True), bf16 autocast: our
                    kernels (policy triton) against PyTorch's, same init and data, losses over 3 steps
  8 tests           the kernel numerics tests, unfiltered, per test outcomes and failure messages
The commit comes from git, or on a machine sent the tree without .git from the COMMIT file written
before the call (mpp.core.provenance.sent_commit).
Writes benchmarks/results/gpu-check-<gpu>.json and .log (copies both to $OUT when it is set); exit status 0
only when every part passed (parts 4-8 may be cut short by the budget; --smoke: CUDA-only parts recorded as skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(REPO := Path(__file__).resolve().parents[1]))  # the check runs from a bare checkout: no install

# The parts that run the check's own code (each in a process of its own) are mpp.bench.gpu_check_parts'.
from mpp.bench.gpu_check_parts import PART_FUNCS, run_part_here
from mpp.bench.pytest_record import TestRecorder, count_outcomes  # noqa: F401 - TestRecorder: tests use it from here
from mpp.core.config import Parser, Range, number_flag
from mpp.core.files import write_json  # atomic: a reader (or a kill) never sees half a file
from mpp.core.provenance import git_commit

RESERVE_S = 2.0  # kept back from the budget for the summary and the copies


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: float  # its own time limit (the remaining budget may cut it)
    smoke: bool = True  # runs in --smoke (tiny shapes on CPU); else recorded as skipped there
    optional: bool = False  # best effort: a budget skip or timeout does not fail the check
    min_s: float = 1.0  # not started with less time left than this


# The answer first: what ran (no measurement), bf16 numerics, then the B/16 training A/B (about 5 of
# the 8 minutes, `--plan`). Everything after it is best effort, in what time is left.
PARTS = (Part("versions", 30), Part("attention_bf16", 45), Part("train_b16", 240, smoke=False, min_s=60),
         Part("train_s16", 120, smoke=False, optional=True, min_s=60), Part("kernel_timings", 80, optional=True),
         Part("verdicts", 75, optional=True), Part("compiled_step", 100, optional=True),
         Part("tests", 140, optional=True))


# ---- the parent: one process per part, the budget, the JSON and the log


def gpu_slug() -> str:
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def command(part: Part, smoke: bool, work: Path, limit_s: float) -> tuple[list[str], Path]:
    """The part's command line and the JSON file it leaves."""
    result = work / f"{part.name}.json"
    py = [sys.executable, "-u"]
    if part.name in PART_FUNCS:
        return [*py, __file__, "--part", part.name, "--result", str(result)] + (["--smoke"] if smoke else []), result
    if part.name == "kernel_timings":  # stops starting cases 15 s before its limit, so it writes its JSON itself
        return [*py, "scripts/bench_kernels.py", "--output", str(result)] + (
            ["--smoke"] if smoke else ["--quick", "--time-limit", f"{max(1.0, limit_s - 15):.0f}"]), result
    model = {"train_s16": "S/16", "train_b16": "B/16"}[part.name]
    # B/16, the question: MPP, timm (SDPA) against ours on PyTorch's ops, with every kernel forced, and
    # with the LayerNorm kernels off, each step's top ops profiled; S/16: ours (auto) against timm.
    legs = (["--legs", "timm", "ours-torch", "ours-triton", "ours-no-ln", "--profile", "10"]
            if part.name == "train_b16" else ["--kernels", "auto"])
    # Regional compilation, as training's --compile: one block's compilation serves all twelve.
    return [*py, "scripts/bench_train.py", "--model", model, "--batch-size", "128", "--dtype", "bf16", "--compile",
            "--compile-scope", "blocks", *legs, "--rounds", "4", "--steps", "5", "--warmup", "2",
            "--loader-batches", "0", "--output", str(result)], result


def judge(part: Part, result: dict) -> tuple[bool, str]:
    """(passed, one line) for a benchmark's JSON; the other parts judge themselves."""
    if not result:
        return False, "the benchmark exited 0 but wrote no results (no CUDA GPU?)"
    if part.name == "kernel_timings":
        rows = [r for r in result.get("attention", []) + result.get("layer_norm", []) if "skipped" not in r]
        broken = [f"{r['op']} {r['shape']}" for r in rows if r["impl"] == "triton" and "error" in r]
        fastest = {}  # (op, shape) -> the fastest other implementation's fwd+bwd ms
        for r in (r for r in rows if r["impl"] != "triton" and "error" not in r):
            fastest[r["op"], r["shape"]] = min(r["fwd+bwd_ms"], fastest.get((r["op"], r["shape"]), math.inf))
        ratios = [f"{r['op']} {r['shape']} {r['fwd+bwd_ms'] / fastest[r['op'], r['shape']]:.2f}" for r in rows
                  if r["impl"] == "triton" and "error" not in r and (r["op"], r["shape"]) in fastest]
        note = "ours/fastest other, fwd+bwd time: " + ", ".join(ratios) + (
            "" if result.get("complete") else " (incomplete: time limit)")
        return not broken, (f"our kernel failed at {', '.join(broken)}; " if broken else "") + note
    r, skipped = result.get("ratios", {}), result.get("legs_skipped", {})
    note = "timm/ours step time: " + ", ".join(
        f"{k.replace('/timm', '')} {v:.3f}" for k, v in r.items() if "/timm" in k)
    return True, note + "".join(f"; {leg} not timed ({why[:80]})" for leg, why in skipped.items())


def run_logged(cmd: list[str], limit_s: float, log) -> tuple[int, bool]:
    """Run cmd in a session of its own (its compile workers too), its output into the log and to
    stdout, killed with its whole group after limit_s. → (exit code, timed out)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            for stream in (log, sys.stdout):
                stream.write(line)
                stream.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # also on SIGTERM or Ctrl-C of the check itself: no part outlives it
        if proc.poll() is None:  # still running, so its process group is still its own
            os.killpg(proc.pid, signal.SIGKILL)  # its compile workers too; its JSON is saved as it goes
            proc.wait()
        reader.join(timeout=5)
    return proc.returncode, timed_out


def run_part(part: Part, smoke: bool, limit_s: float, work: Path, log) -> dict:
    cmd, result_path = command(part, smoke, work, limit_s)
    started = time.monotonic()
    print(f"== {part.name}: {' '.join(cmd[2:])} (limit {limit_s:.0f} s)", file=log, flush=True)
    print(f"== {part.name} (limit {limit_s:.0f} s)", flush=True)
    rc, timed_out = run_logged(cmd, limit_s, log)
    entry = {"seconds": round(time.monotonic() - started, 1), "limit_s": round(limit_s, 1), "exit_code": rc,
             "command": " ".join(cmd[2:])}
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {}
    if "tests" in result and "counts" not in result:  # pytest did not finish: count what it recorded
        result["counts"] = count_outcomes(result["tests"])  # "started": the test it was stopped in
    if timed_out:
        entry["status"], entry["reason"] = "timeout", f"past its limit of {limit_s:.0f} s"
    elif rc != 0:
        entry["status"], entry["reason"] = "error", f"exit code {rc}: {result.get('exception', 'see the log')}"
    elif "passed" in result:
        entry["status"] = "passed" if result.pop("passed") else "failed"
    else:
        passed, entry["summary"] = judge(part, result)
        entry["status"] = "passed" if passed else "failed"
    entry["summary"] = result.pop("summary", entry.get("summary", ""))
    entry["result"] = result
    print(f"== {part.name}: {entry['status']} after {entry['seconds']} s", file=log, flush=True)
    return entry


def summary_table(record: dict) -> str:
    lines = [f"{'part':<16}{'status':<9}{'seconds':>8}{'limit':>7}  note"]
    for name, p in record["parts"].items():
        lines.append(f"{name:<16}{p['status']:<9}{p.get('seconds', 0):>8.1f}{p.get('limit_s', 0):>7.0f}  "
                     f"{(p.get('reason') or p.get('summary') or '')[:150]}")
    lines.append(f"overall: {'PASSED' if record['passed'] else 'NOT PASSED'} in {record['elapsed_s']:.0f} s "
                 f"of {record['budget_s']:.0f} s")
    return "\n".join(lines)


def publish(record: dict, json_path: Path, log_path: Path) -> None:
    """The JSON, and both files to $OUT (the device tool's folder that comes back) after every part."""
    write_json(json_path, record)
    if os.environ.get("OUT"):
        for path in (json_path, log_path):
            shutil.copy2(path, Path(os.environ["OUT"]) / path.name)


def run_all(args) -> int:
    start = time.monotonic()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = "smoke-cpu" if args.smoke else gpu_slug()
    json_path, log_path = out_dir / f"gpu-check-{slug}.json", out_dir / f"gpu-check-{slug}.log"
    only = selected(args.only)
    record = {"check": "scripts/gpu_check.py", "mode": "smoke" if args.smoke else "gpu", "gpu_slug": slug,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": args.budget,
              "commit": git_commit(REPO), "argv": sys.argv[1:], "host": platform.node(), "parts": {},
              "passed": False, "elapsed_s": 0.0}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer timeout: finally-blocks still run
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        try:
            for part in PARTS:
                left = args.budget - (time.monotonic() - start) - RESERVE_S
                limit = min(part.limit_s, left)
                if only is not None and part.name not in only:
                    entry = {"status": "skipped", "reason": "not in --only"}
                elif args.smoke and not part.smoke:
                    entry = {"status": "skipped", "reason": "needs CUDA (bf16 training shapes, compiled models)"}
                elif limit < part.min_s:
                    entry = {"status": "skipped", "reason": f"budget: {max(left, 0):.0f} s left"}
                else:
                    entry = run_part(part, args.smoke, limit, Path(work), log)
                entry["optional"] = part.optional
                record["parts"][part.name] = entry
                record["elapsed_s"] = round(time.monotonic() - start, 1)
                publish(record, json_path, log_path)
        finally:
            def fine(p: dict) -> bool:  # skipped by design: another mode's part, or part 6 out of budget
                return p["status"] == "passed" or (p["status"] in ("skipped", "timeout") and (
                    p.get("optional") or p.get("reason", "").startswith(("needs CUDA", "not in --only"))))

            record["passed"] = len(record["parts"]) == len(PARTS) and all(fine(p) for p in record["parts"].values())
            record["elapsed_s"] = round(time.monotonic() - start, 1)
            table = summary_table(record)
            print(table, file=log)
            log.flush()
            publish(record, json_path, log_path)
            print(f"\n{table}\nwrote {json_path} and {log_path}", flush=True)
    return 0 if record["passed"] else 1


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="CPU: tiny shapes, fp32, Triton's interpreter (TRITON_INTERPRET=1); CUDA-only parts skipped")
    p.add_argument("--output-dir", default=str(REPO / "benchmarks" / "results"),
                   help="where gpu-check-<gpu>.json and .log go (and to $OUT as well when it is set)")
    number_flag(p, "--budget", float, Range(1, 3600), default=480.0, metavar="SECONDS",
                help="the whole run's wall-clock budget; each part's limit is cut to what is left")
    p.add_argument("--plan", action="store_true", help="print the parts in order with their limits, and exit")
    p.add_argument("--only", default="", help=f"comma-separated parts to run: {', '.join(x.name for x in PARTS)}")
    p.add_argument("--part", choices=sorted(PART_FUNCS), help=argparse.SUPPRESS)  # a part's own process
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def plan(budget: float) -> str:
    """The parts in the order they run, each with its limit and the latest second it can end at (the
    budget cuts a limit to what is left): what a lease buys, read before one is spent."""
    lines = [f"{'part':<16}{'limit s':>8}{'ends by s':>11}  (budget {budget:.0f} s, {RESERVE_S:.0f} s kept back)"]
    end = 0.0
    for part in PARTS:
        end = min(end + part.limit_s, budget - RESERVE_S)
        note = "best effort" if part.optional else "must pass"
        lines.append(f"{part.name:<16}{part.limit_s:>8.0f}{end:>11.0f}  {note}{'' if part.smoke else ', CUDA only'}")
    return "\n".join(lines)


def selected(only: str) -> set[str] | None:
    """The parts --only names (None: all)."""
    return {name.strip() for name in only.split(",") if name.strip()} if only else None


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    unknown = (selected(args.only) or set()) - {p.name for p in PARTS}
    if unknown:
        parser.error(f"--only names {', '.join(sorted(unknown))}: pass some of {', '.join(p.name for p in PARTS)}")
    if args.plan:
        print(plan(args.budget))
        return
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: --smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
    if args.part:
        run_part_here(args.part, args.smoke, Path(args.result))
        return
    sys.exit(run_all(args))


if __name__ == "__main__":
    main()
