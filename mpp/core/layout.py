"""The names of a run directory's files: one definition for the stage that writes them (mpp.run.rundir,
whose docstring draws the layout), the data stage that must not read a run as images (mpp.data.folder_walk)
and the reports that read them back (mpp.report)."""
from __future__ import annotations

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
LOCK = "run.lock"
FINETUNE = "finetune.json"  # a fine-tune's results, in its own --output-dir
# The probes' reports, written beside the run they evaluate (a --name suffix before .json).
FEWSHOT_GLOB = "fewshot*.json"
LINEAR_PROBE_GLOB = "linear-probe*.json"
KNN_GLOB = "knn*.json"
# The reports an evaluation writes, as globs relative to the folder that holds them.
REPORT_GLOBS = (SUMMARY, FEWSHOT_GLOB, LINEAR_PROBE_GLOB, KNN_GLOB, FINETUNE, f"finetune*/{FINETUNE}")
# A folder holding one of these is a run (checkpoints, metrics, copied samples), never data.
RUN_MARKERS = (CONFIG, METRICS)
