#!/usr/bin/env bash
# The GPU check: ONE run of at most 8 minutes on a bare GPU machine (torch, triton and timm installed,
# this repository not: PYTHONPATH is set here), for the device tool's one call:
#
#   bash scripts/gpu_check.sh                                  # every part, 480 s budget
#   bash scripts/gpu_check.sh --only tests,attention_bf16      # some parts again
#
# scripts/gpu_check.py does the work (parts, their limits, the budget; see its docstring) and writes
# benchmarks/results/gpu-check-<gpu>.json and .log, copied to $OUT when it is set. The outer timeout
# is a last resort past the budget: its SIGTERM makes the check stop its running part and write the
# JSON; SIGKILL follows 15 s later. Give the device call a timeout_s of about 560. The device machine
# gets the tree without .git: before the call, write the commit it is (`git rev-parse HEAD > COMMIT`,
# plus "+dirty" when the tree differs), which the results then record (mpp.core.provenance.sent_commit).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout --kill-after=15 520 python3 scripts/gpu_check.py "$@"
