"""A report's tables kept equal to the files they come from.

A results report (results/<study>/REPORT.md) marks each generated table:

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

and the study's own tables script computes every NAME from committed files and calls `sync`:
print them, write them between the markers (`--write`), or exit 1 naming each table that differs
(`--check`, which a test runs so a stale number fails CI). Numbers are accuracies as fractions,
shown in % with one decimal; ± is the population standard deviation (ddof=0), as the probes write it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

MARKER = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /table -->)", re.S)


@cache
def read(path: Path) -> dict:
    """A committed JSON record, read once however many cells a tables script takes from it."""
    return json.loads(Path(path).read_text())


def _cell(entry: dict, key: str | None) -> float:
    """An accuracy from one entry of a probe report: a few-shot shot count's mean or a k-NN k's
    accuracy (`key`: shots or k), or the linear probe's accuracy (no key)."""
    if key is None:
        return entry["accuracy"]
    cell = entry[key]
    return cell["mean"] if "mean" in cell else cell["accuracy"]


def score(report: Path, feature: str | None = None, key: str | None = None) -> float:
    """The probed model's accuracy in a probe report (fewshot*.json, knn*.json with `key`: shots or k;
    linear-probe*.json without): its headline feature (None) or one feature of its --layers sweep."""
    data = read(report)
    if feature is not None:
        return _cell(data["layers"]["results"][feature], key)
    return _cell(data["results"] if key is not None else data, key)


def reference(report: Path, which: str, feature: str | None = None, key: str | None = None) -> float:
    """A reference's accuracy in a probe report: "pixels" or "random_init" (with `feature`: the random
    init's feature of the --layers sweep)."""
    data = read(report)
    if feature is not None:
        return _cell(data["layers"][which][feature], key)
    ref = data["references"][which]
    return _cell(ref["results"] if key is not None else ref, key)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pm(values) -> str:
    """mean ± population std of accuracies (fractions), in %."""
    v = np.asarray(values, dtype=float)
    return f"{pct(v.mean())} ± {pct(v.std())}"


def signed(x: float) -> str:
    """A difference of fractions in points, with its sign (a typographic minus); 0.0 unsigned."""
    text = f"{100 * x:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text.replace("-", "−")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sync(tables: dict[str, Callable[[], str]], report: Path, argv: list[str], command: str) -> int:
    """The tables script's command line: no flag prints every table; --write puts them into `report`
    between their markers; --check returns 1 (and names each) if a marked table differs or one is
    missing. --report PATH reads another copy (the test that --check can fail). → exit code."""
    made = {name: make() for name, make in tables.items()}
    report = Path(argv[argv.index("--report") + 1]) if "--report" in argv else report
    if "--write" not in argv and "--check" not in argv:
        for name, text in made.items():
            print(f"<!-- table: {name} -->\n{text}\n<!-- /table -->\n")
        return 0
    text = report.read_text()
    found = {m["name"] for m in MARKER.finditer(text)}
    missing = sorted(set(made) - found)
    if "--check" in argv:
        stale = [m["name"] for m in MARKER.finditer(text) if m["body"] != made.get(m["name"])]
        for name in stale + missing:
            print(f"{report.name} table '{name}' differs from the files: run {command} --write")
        return 1 if stale or missing else 0
    report.write_text(MARKER.sub(lambda m: m[1] + made[m["name"]] + m[4], text))
    print(f"wrote {len(found)} tables into {report}" + (f"; not in the report: {missing}" if missing else ""))
    return 0
