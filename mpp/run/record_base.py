"""What every report dataclass (mpp.run.records, mpp.run.probe_records) shares: `Record` (to_json, a checked
from_json), `Report` (a whole file, whose problems name its kind), `part` (a field and the reader that
checks its JSON value), the readers, and the one-line `MalformedReport`.

A field's name is its JSON key; the fields' order is the order its writer writes the keys, so
`to_json()` of what a writer builds is its file, byte for byte. A field left None is not written,
except those marked `null=True`: for them null is what the writers record ("no checkpoint"), and a
file without the key reads as None and is written back with it, null. Keys a class does not know are
kept in its `extra` field (`kept()`) and written back after the known ones; a class without one drops them.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

from mpp.core.errors import UsageError

REDO = "rerun the evaluation or move the file away"
R = TypeVar("R")
Reader = Callable[[Any, str], Any]  # (a JSON value, where it is: "references.pixels.accuracy") → the field's value


class MalformedReport(UsageError):
    """A report, or a part of one, that its readers cannot use. A part's reader raises it with the
    `problem` alone; the report's `from_json` names the kind (`what`), `read_record` the file, so the
    line reads as the readers' always have: "'<file>' is not a few-shot report (<problem>): <fix>"."""

    def __init__(self, problem: str, *, out_of_range: bool = False, what: str | None = None, fix: str = REDO,
                 path: Path | None = None):  # out_of_range: a number of the right type outside its range
        self.problem, self.out_of_range, self.what, self.fix, self.path = problem, out_of_range, what, fix, path
        super().__init__(self.line())

    def line(self) -> str:
        if self.what is None:
            return self.problem
        subject = f"'{self.path}' is" if self.path is not None else "this is"
        return f"{subject} not a {self.what} report ({self.problem}): {self.fix}"

    def named(self, what: str, fix: str) -> MalformedReport:
        return MalformedReport(self.problem, out_of_range=self.out_of_range, what=what, fix=fix, path=self.path)

    def at(self, path: Path) -> MalformedReport:
        return MalformedReport(self.problem, out_of_range=self.out_of_range, what=self.what, fix=self.fix, path=path)


# ---------------------------------------------------------------- readers of one JSON value

def place(at: str) -> tuple[str, str]:
    """("accuracy", " in references.pixels") for "references.pixels.accuracy": a key, and where it is."""
    parent, _, key = at.rpartition(".")
    return key, f" in {parent}" if parent else ""


def shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def number(low: float | None = None, high: float | None = None, *, integer: bool = False, finite: bool = True,
           positive: bool = False) -> Reader:
    """An int (`integer`) or a number, not a bool, finite unless `finite` is False, in [low, high]
    (either bound may be None), and above 0 when `positive`. The value is kept as read: an int stays one."""
    kind = "an integer" if integer else "a number"

    def read(value, at: str):
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            raise MalformedReport(f"'{at}' is {shown(value)}, not {kind}")
        if finite and not math.isfinite(value):
            raise MalformedReport(f"'{at}' is {value}, not a finite number")
        if positive and value <= 0:
            raise MalformedReport(f"'{at}' is {value}, not positive", out_of_range=True)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"below {low:g}" if high is None else f"outside [{low:g}, {high:g}]"
            raise MalformedReport(f"'{at}' is {value}, {bounds}", out_of_range=True)
        return value

    return read


FRACTION = number(0, 1)  # an accuracy (or a std of accuracies): a share of the images scored
COUNT = number(0, integer=True)  # images, steps
AT_LEAST_1 = number(1, integer=True)  # shots, k, a block, classes, pixels, feature dimensions
INTEGER = number(integer=True)  # a seed
POSITIVE = number(positive=True)  # an l2 penalty, a learning rate, a temperature
SECONDS = number(0)
# A number no reader shows or computes with (a logged metric, one seed's accuracy, a dev accuracy): its type is
# checked, not its range (a diverged loss is NaN, and still what was logged).
NUMBER = number(finite=False)


def text(value, at: str) -> str:
    if not isinstance(value, str):
        raise MalformedReport(f"'{at}' is {shown(value)}, not a string")
    return value


def flag(value, at: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedReport(f"'{at}' is {shown(value)}, not true or false")
    return value


def obj(value, at: str) -> dict:
    """A JSON object whose inside no reader relies on (a ViT config, a kernels record), kept as it is."""
    if not isinstance(value, dict):
        raise MalformedReport(f"'{at}' is {shown(value)}, not an object")
    return value


def as_is(value, at: str):
    return value


def list_of(read: Reader) -> Reader:
    def read_list(value, at: str) -> list:
        if not isinstance(value, list):
            raise MalformedReport(f"'{at}' is {shown(value)}, not a list")
        return [read(v, f"{at}[{i}]") for i, v in enumerate(value)]

    return read_list


def map_of(read: Reader) -> Reader:
    def read_map(value, at: str) -> dict:
        return {k: read(v, f"{at}.{k}") for k, v in obj(value, at).items()}

    return read_map


def record_of(cls: type[Record]) -> Reader:
    return cls.from_json


def worded(read: Reader, problem: str) -> Reader:
    """`read`, saying `problem` (a template of {key} and {inside}) for a value that is no finite number of its kind."""
    def read_worded(value, at: str):
        try:
            return read(value, at)
        except MalformedReport as e:
            if e.out_of_range:
                raise
            key, inside = place(at)
            raise MalformedReport(problem.format(key=key, inside=inside)) from None

    return read_worded


# ---------------------------------------------------------------- the shared base

def part(read: Reader = as_is, *, null: bool = False, required: bool = False, missing: str | None = None):
    """A record's field (its JSON key is its name). `read` checks and converts the JSON value; `null`:
    None is written as null (else a None field is left out); `required`: a report without it is refused,
    `missing` (a template of {key} and {inside}) saying so."""
    metadata = {"read": read, "null": null, "missing": missing}
    return field(metadata=metadata) if required else field(default=None, metadata=metadata)


def kept():
    """The keys a class does not know, in the order read: written back after the known ones."""
    return field(default_factory=dict, repr=False, metadata={"extra": True})


def encode(value):
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


class Record:
    """What every report dataclass (and each part of one) shares: `to_json` and a checked `from_json`."""

    def to_json(self) -> dict:
        out, extra = {}, {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("extra"):
                extra = value
            elif value is not None or f.metadata.get("null"):
                out[f.name] = encode(value)
        return {**out, **extra}

    @classmethod
    def from_json(cls, found, at: str = "") -> Self:
        """The record `found` (a JSON object) holds; `at` names where it is inside a report, for messages."""
        if not isinstance(found, dict):
            raise MalformedReport(f"'{at}' is {shown(found)}, not an object" if at
                                  else f"a JSON {type(found).__name__}, not an object")
        values, known, keep = {}, set(), None
        for f in fields(cls):
            if f.metadata.get("extra"):
                keep = f.name
                continue
            known.add(f.name)
            where = f"{at}.{f.name}" if at else f.name
            if f.name not in found:
                if f.default is MISSING:
                    key, inside = place(where)
                    missing = f.metadata.get("missing") or "no '{key}'{inside}"
                    raise MalformedReport(missing.format(key=key, inside=inside))
                continue
            value = found[f.name]
            values[f.name] = None if value is None and f.default is None else f.metadata["read"](value, where)
        if keep:
            values[keep] = {k: v for k, v in found.items() if k not in known}
        record = cls(**values)
        record.check()
        return record

    def check(self) -> None:
        """What holds across fields, once each field passed its own reader (nothing by default)."""


class Report(Record):
    """A whole report file: its problems are named as this kind's (`WHAT`), with what to do (`FIX`)."""

    WHAT: ClassVar[str] = "probe"
    FIX: ClassVar[str] = REDO

    @classmethod
    def from_json(cls, found, at: str = "") -> Self:
        try:
            return super().from_json(found, at)
        except MalformedReport as e:
            raise e.named(cls.WHAT, cls.FIX) from None


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a missing, torn or non-object file is one line naming it."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read '{path}' ({type(e).__name__}): it is truncated or not JSON; "
                         "rerun what wrote it or move it out of the run directory") from e
    if not isinstance(found, dict):
        raise UsageError(f"'{path}' holds a JSON {type(found).__name__}, not an object: rerun what wrote it "
                         "or move it out of the run directory")
    return found


def parse_record(path: Path, found: dict, cls: type[R]) -> R:
    """`cls.from_json(found)`, a problem naming `path`, the file `found` was read from."""
    try:
        return cls.from_json(found)
    except MalformedReport as e:
        raise e.at(path) from None


def read_record(path: Path, cls: type[R]) -> R:
    return parse_record(path, read_json(path), cls)


# ---------------------------------------------------------------- containers of per-kind results

@dataclass(kw_only=True)
class LayerSpec(Record):
    """One feature of a per-block sweep (mpp.eval.features.FeatureSpec); exactly these four keys."""

    name: str = part(text, required=True)  # "<block>/<pool>[+norm]", e.g. "6/token+norm": how tables name it
    layer: int = part(AT_LEAST_1, required=True)  # the block, 1..depth
    pool: str = part(text, required=True)  # "token" (the class token) | "avg" (the mean patch token)
    norm: bool = part(flag, required=True)  # through the final LayerNorm

    @property
    def variant(self) -> str:
        """The feature variant, the same at every block: "token", "token+norm", "avg", "avg+norm"."""
        return self.pool + ("+norm" if self.norm else "")

    def check(self) -> None:
        if not self.pool or self.name != f"{self.layer}/{self.variant}":
            raise MalformedReport(f"its name '{self.name}' is not '{self.layer}/{self.variant}'")


@dataclass(kw_only=True)
class LayerSweep(Record, Generic[R]):
    """A report's optional "layers" (`--layers`): every block's features, probed from one forward pass.
    A feature without a result is allowed (a `–` cell); a result of a feature no spec names is not."""

    features: list[str] | None = part(list_of(text))  # the specs' names, in their order
    specs: list[LayerSpec] = part(required=True)  # what each feature is, in block order
    results: dict[str, R] = part(required=True)  # feature name → its result, shaped as the report's own
    random_init: dict[str, R] | None = part()  # the same for the random-init reference, when it was scored
    extra: dict = kept()
    READ_ONE: ClassVar[Reader]  # one feature's result

    @classmethod
    def from_json(cls, found, at: str = "layers") -> Self:
        def bad(problem: str, out_of_range: bool = False) -> MalformedReport:
            return MalformedReport(f"malformed 'layers': {problem}", out_of_range=out_of_range)

        listed = found.get("specs") if isinstance(found, dict) else None
        if not isinstance(listed, list) or not listed:
            raise bad("no 'specs' list")
        specs = []
        for spec in listed:
            try:
                specs.append(LayerSpec.from_json(spec, f"{at}.specs"))
            except MalformedReport:
                raise bad(f"spec {json.dumps(spec)[:80]} is not {{name: '<block>/<pool>[+norm]', layer, pool, norm}}") \
                    from None
        names = [s.name for s in specs]
        if found.get("features", names) != names:
            raise bad("'features' and 'specs' list different features")
        parsed = {}
        for key in ("results", "random_init"):
            results = found.get(key)
            if results is None and key == "random_init":
                continue
            if not isinstance(results, dict) or not results:
                raise bad(f"no '{key}' object")
            unknown = [n for n in results if n not in names]
            if unknown:
                raise bad(f"'{key}' has a result for '{unknown[0]}', which no spec names")
            try:
                parsed[key] = {n: cls.READ_ONE(r, f"{at}.{key}.{n}") for n, r in results.items()}
            except MalformedReport as e:
                if e.out_of_range:
                    raise bad(f"a result in '{key}' out of range ({e.problem})", True) from None
                raise bad(f"a result in '{key}' without a numeric accuracy ({e.problem})") from None
        kept_keys = ("features", "specs", "results", "random_init")
        return cls(features=names if "features" in found else None, specs=specs, **parsed,
                   extra={k: v for k, v in found.items() if k not in kept_keys})

    @property
    def blocks(self) -> list[int]:
        return sorted({s.layer for s in self.specs})

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(s.variant for s in self.specs))


@dataclass(kw_only=True)
class References(Record, Generic[R]):
    """A probe report's "references": the same probe, on the same images, of two baselines. Other keys
    are kept for newer readers."""

    random_init: R | None = part()  # an untrained ViT of the same architecture (seeded by the report's reference_seed)
    pixels: R | None = part()  # the raw pixels at the model's resolution (above 32 px: averaged to 32×32)
    extra: dict = kept()
    OF: ClassVar[type[Record]]  # the class of one reference

    @classmethod
    def from_json(cls, found, at: str = "references") -> Self:
        if not isinstance(found, dict):
            raise MalformedReport("'references' is not an object")
        parts = {}
        for key in ("random_init", "pixels"):
            if key in found:
                if not isinstance(found[key], dict):
                    raise MalformedReport(f"references.{key} is not an object")
                parts[key] = cls.OF.from_json(found[key], f"references.{key}")
        return cls(**parts, extra={k: v for k, v in found.items() if k not in ("random_init", "pixels")})

    def items(self) -> list[tuple[str, R]]:
        """(key, reference) of those present: random init first."""
        return [(k, v) for k, v in (("random_init", self.random_init), ("pixels", self.pixels)) if v is not None]


def by_key(cls: type[R], found, at: str) -> dict[str, R]:
    """{key: cls} of a JSON object of results ("1", "5" shots; "10", "20" neighbours). A result without
    its own count (`cls.COUNT`: old reports) is counted by its key, which must then be an integer."""
    key, inside = place(at)
    if not isinstance(found, dict) or not found:
        raise MalformedReport(f"no '{key}'{inside}")
    parsed = {}
    for name, value in found.items():
        parsed[name] = cls.from_json(value, f"{at}.{name}")
        if getattr(parsed[name], cls.COUNT) is None and not name.isdigit():
            raise MalformedReport(f"'{at}.{name}' has no '{cls.COUNT}', and its key is no number either")
    return parsed


def counted(results: dict[str, R]) -> dict[int, R]:
    """{count: result} of `by_key`'s results, by increasing count (shots or k)."""
    found = {getattr(r, r.COUNT) if getattr(r, r.COUNT) is not None else int(k): r for k, r in results.items()}
    return dict(sorted(found.items()))


def results_of(cls: type[Record], number_name: str) -> Reader:
    """The reader of a report's (or a reference's) "results": by_key, a problem naming the result."""
    def read(found, at: str) -> dict:
        _, inside = place(at)
        if not isinstance(found, dict) or not found:
            raise MalformedReport(f"no 'results'{inside}")
        try:
            return by_key(cls, found, at)
        except MalformedReport as e:
            if e.out_of_range:
                raise MalformedReport(f"a result{inside} out of range: {e.problem}", out_of_range=True) from None
            raise MalformedReport(f"a result{inside} without a numeric {number_name}: {e.problem}") from None

    return read
