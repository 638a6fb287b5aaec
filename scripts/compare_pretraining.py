"""MPP vs supervised pretraining vs training from scratch, from one command.

Stages, each one command of this repository (printed, and saved to ROOT/commands.sh so every number
can be rerun by hand):
  1. pretrain on the training images: MPP without labels, supervised with labels; with --ablations
     also the other MPP targets (those of mpp.model.objective.TARGETS with an ablation run: 4×4 downsample,
     L2 pixels) and a 15% corruption rate (the paper's). With --unlabelled every MPP run pretrains on an
     unlabelled view of the dataset (mpp.data.unlabelled_view: <dataset>-unlabelled, built once), so no
     label is ever within its reach, and its in-run probe scores the labelled dataset;
  2. fine-tune on a labelled subset (--train-fraction) from MPP, from supervised, and from scratch;
     lr from a grid on a dev split of that subset, then --seeds trainings scored on the test split;
  3. few-shot probes (1/5/10/25 shots × --fewshot-seeds draws), full linear probes and k-NN (k = 10, 20)
     of every model, of every block's features, and of the two references (a random init, the raw
     pixels), on the labelled dataset and, with --transfer, few-shot on another dataset (also probed
     inside pretraining, about every epoch);
  4. eval/compare.py: one table and the plots, in --output; with --keep, every run's small records
     (JSON, JSONL, markdown; no checkpoint) and commands.sh copied into a folder to commit.

A stage whose result is already in ROOT is skipped (an interrupted stage resumes), so rerunning the
command after a crash finishes the comparison. `--budget` picks model size and lengths:
smoke (seconds, for tests), cpu (the CIFAR-10 run on 2 CPU cores in results/cifar10), cpu64 (Imagenette
at 64 px on 2 CPU cores), gpu (larger).

    python scripts/compare_pretraining.py --dataset data/cifar10 --transfer data/imagenette --budget cpu
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from any folder

from mpp.core.config import Parser, Range, number_flag  # noqa: E402
from mpp.core.errors import UsageError, cli_main  # noqa: E402
from mpp.run.rundir import (  # noqa: E402
    CONFIG,
    FINETUNE,
    RESUMABLE,
    SUMMARY,
    changed_settings,
    list_checkpoints,
)


@dataclass(frozen=True)
class Budget:
    model: str  # ViT preset of every model
    image_size: int  # pretraining and fine-tuning resolution
    pretrain_epochs: float  # passes over the training images, MPP and supervised alike
    pretrain_batch: int
    pretrain_lr: float  # AdamW peak lr (both objectives)
    pretrain_warmup: int  # warmup steps
    crop_scale: tuple[float, float]  # random-resized-crop area range, pretraining and fine-tuning
    finetune_epochs: float  # passes over the labelled subset, per training (grid and final)
    finetune_batch: int
    finetune_lrs: tuple[float, ...]  # SGD lr grid
    finetune_warmup: int
    fewshot_max_test: int  # 0: the whole test split
    fewshot_every: int  # pretraining steps between in-run few-shot probes (about one epoch)


BUDGETS = {
    # A few steps of everything: checks the pipeline, not the science. Its 11 pretraining steps are
    # probed in the run at step 0 and at the end only (the probe would cost more than the training).
    "smoke": Budget("Micro/4", 16, 0.5, 64, 1e-3, 2, (0.35, 1.0), 1, 32, (0.01, 0.03), 1, 0, 100),
    # CIFAR-10 on 2 CPU cores in about an hour and a half: 17 tokens per image (8×8 patches at 32 px).
    "cpu": Budget("Micro/8", 32, 4, 256, 1e-3, 100, (0.35, 1.0), 8, 128, (0.01, 0.03, 0.1), 20, 0, 195),
    # Imagenette (9,469 train / 3,925 val images, 10 classes) at 64 px on 2 CPU cores: 65 tokens per image
    # (8×8 patches). MPP pretraining runs ~230 images/s here, so each pretraining's 30 epochs (2,220 steps
    # of batch 128, 74 a epoch) take about 20 minutes; the comparison without ablations about 1 h 15.
    # Probed in the run about every 5 epochs (370 steps): each probe embeds the whole val split.
    "cpu64": Budget("Micro/8", 64, 30, 128, 1e-3, 100, (0.35, 1.0), 20, 64, (0.01, 0.03, 0.1), 20, 0, 370),
    # One GPU: the paper's small-image model (Ti/4, 65 tokens) for far longer.
    "gpu": Budget("Ti/4", 32, 100, 512, 1e-3, 2000, (0.35, 1.0), 30, 256, (0.003, 0.01, 0.03, 0.1), 100, 0, 980),
}


def pretrainings() -> dict[str, tuple[str, list[str]]]:
    """name → (pretraining script, extra flags); the first two are the comparison, the rest the paper's
    ablations: every MPP target with an ablation run (mpp-4x4, mpp-l2, in the table's order), then 15%
    corruption. Read when the pipeline runs: mpp.model.objective imports torch, which --help does without."""
    from mpp.model.objective import TARGETS

    return {
        "mpp": ("mpp", []),
        "supervised": ("supervised", []),
        **{t.arm: ("mpp", ["--target", t.name]) for t in TARGETS.values() if t.arm},
        "mpp-15pct": ("mpp", ["--corrupt-rate", "0.15"]),
    }


def dataset_folder(spec: str) -> str:
    """A folder, an hf: name or digits as given; a .tar.gz archive is unpacked once beside the data."""
    if not spec.endswith((".tar.gz", ".tgz")):
        return spec
    archive = Path(spec)
    if not archive.is_file():
        raise UsageError(f"dataset archive '{spec}' does not exist: pass an image folder or an existing archive")
    target = REPO / "data" / archive.name.split(".")[0].removesuffix("_jpg").removesuffix("_128px")
    if not (target / "train").is_dir():  # only ever made whole, by unpack's rename
        unpack(archive, target)
    # Relative to the working directory when inside it ("data/cifar10"): run configs stay portable.
    return str(target.relative_to(Path.cwd())) if target.is_relative_to(Path.cwd()) else str(target)


UNPACKING = ".unpacking-"  # unpack's temporary sibling: .<name>.unpacking-<pid of the unpacker>


def unpack(archive: Path, target: Path) -> None:
    """Unpack `archive` into a temporary sibling of `target` (the same filesystem), then rename it into
    place in one step: an interrupted unpack never leaves a half folder that a rerun would trust."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_killed_unpacks(target)
    if target.exists() and any(target.iterdir()):  # not ours: a rename would fail, or hide what is there
        raise UsageError(f"'{target}' exists but holds no train/ folder: remove it (an unpack cut short by an "
                         "older version?) and rerun, or pass an image folder instead of the archive")
    work = target.with_name(f".{target.name}{UNPACKING}{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)  # a dead process's leftover whose pid this one reuses
    try:
        extract(archive, work)
        if not (work / "train").is_dir():
            raise UsageError(f"archive '{archive}' holds no train/ folder: pass an archive of train/ and test/ "
                             "(or val/) folders, at its top or inside one folder")
        try:
            os.replace(work, target)  # atomic; replaces an empty target folder
        except OSError:
            if not (target / "train").is_dir():
                raise
            # another process unpacked the same archive first: keep its folder, drop ours
    finally:
        shutil.rmtree(work, ignore_errors=True)  # on an error or Ctrl-C; a SIGKILL's is removed by the next run


def remove_killed_unpacks(target: Path) -> None:
    """Delete the temporary folders of unpacks whose process is gone (a SIGKILL runs no cleanup): they are
    never read, and hold up to a dataset's worth of files. One whose unpacker may still run stays."""
    from mpp.core.files import process_alive

    for work in target.parent.glob(f".{target.name}{UNPACKING}*"):
        pid = work.name.rsplit(UNPACKING, 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(work, ignore_errors=True)


class UnsafeMember(Exception):
    """A member that would land outside the destination, found by check_member (Pythons without the data filter)."""


# What an unsafe member raises: tarfile's FilterError where the data filter exists, else our own.
UNSAFE = (UnsafeMember, tarfile.FilterError) if hasattr(tarfile, "data_filter") else (UnsafeMember,)
# What a truncated or corrupted archive (a copy cut short) raises part way through.
UNREADABLE = (tarfile.ReadError, EOFError, gzip.BadGzipFile, zlib.error)


def extract(archive: Path, work: Path) -> None:
    """Every member of `archive` under `work`, without the archive's one top folder if it has one; a
    member that would land outside `work` (an absolute or ../ path, a link out) is refused."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            # Archives hold train/... directly or one top folder around it.
            top = {m.name.split("/")[0] for m in members}
            strip = len(top) == 1 and not {"train", "test", "val"} & top
            for m in members:
                if strip:
                    m.name = m.name.partition("/")[2]
                if m.name:
                    extract_member(tar, m, work)
    except UNSAFE as e:
        raise UsageError(f"archive '{archive}' has an unsafe member ({e}): check it, unpack it by hand "
                         "and pass the folder") from e
    except UNREADABLE as e:
        raise UsageError(f"archive '{archive}' cannot be read ({type(e).__name__}: {e}): it is truncated or "
                         "corrupted, copy it again") from e


def extract_member(tar: tarfile.TarFile, m: tarfile.TarInfo, work: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # Python 3.10.12+ / 3.11.4+: the standard checks
        tar.extract(m, work, filter="data")
    else:
        check_member(m, work)
        tar.extract(m, work)


def check_member(m: tarfile.TarInfo, work: Path) -> None:
    """The fallback for a Python without tarfile's data filter: plain files and folders inside `work` only."""
    dest = (work / m.name).resolve()
    if not (m.isfile() or m.isdir()) or not dest.is_relative_to(work.resolve()):
        raise UnsafeMember(f"{m.name!r} is not a file or folder inside the destination")


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args, self.budget = args, BUDGETS[args.budget]
        self.root = Path(args.root)
        self.launch = shlex.split(args.launch) if args.launch else [sys.executable]
        self.commands: list[str] = []
        from mpp.data.unlabelled_view import unlabelled_view  # imports torch, which --help does without

        # MPP's data: with --unlabelled the view, checked here (a dataset that has none is refused before
        # anything is written) and built when the pipeline runs, never by a dry run.
        self.view = functools.partial(unlabelled_view, args.dataset) if args.unlabelled else None
        self.mpp_data = self.view(build=False) if self.view else args.dataset

    def run(self, argv: list[str], launched: bool = False, skip: str = "") -> None:
        """Run one stage command (printed and recorded; its failure stops the pipeline), or with `skip`
        (why) only record it: commands.sh lists every stage, run by this pass or found finished."""
        script = argv[0] if Path.cwd() == REPO else str(REPO / argv[0])  # stages run where this was started
        cmd = (self.launch if launched else [sys.executable]) + [script, *argv[1:]]
        text = shlex.join(cmd).replace(shlex.quote(sys.executable), "python", 1)
        self.commands.append(text)
        print(f"[skip] {skip}" if skip else f"\n$ {text}", flush=True)
        if self.args.dry_run or skip:
            return
        done = subprocess.run(cmd)
        if done.returncode:
            raise UsageError(f"stage failed (exit {done.returncode}): {text}: fix what it printed above, "
                             "then rerun this command; finished stages are kept")

    def pretrain_flags(self, name: str) -> list[str]:
        (script, script_flags), b, a = pretrainings()[name], self.budget, self.args
        if script == "mpp" and a.unlabelled:  # its own data has no labels: the in-run probe scores the labelled set
            probed = ["--fewshot-dataset", a.dataset]
        elif a.transfer and transfer_name(a.transfer) != transfer_name(a.dataset):
            probed = ["--fewshot-dataset", a.transfer]
        else:
            probed = []
        return ["--dataset", self.mpp_data if script == "mpp" else a.dataset, "--model", b.model,
                "--image-size", str(b.image_size),
                "--batch-size", str(b.pretrain_batch), "--epochs", f"{b.pretrain_epochs:g}",
                "--lr", f"{b.pretrain_lr:g}", "--warmup-steps", str(b.pretrain_warmup),
                "--crop-scale", *(f"{c:g}" for c in b.crop_scale), "--log-every", "20", "--save-every", "200",
                "--seed", "0", "--fewshot-every", str(b.fewshot_every), *probed,
                *script_flags, "--output-dir", str(self.root / name)]

    def pretrain(self, name: str) -> None:
        run = self.root / name
        script, flags = pretrainings()[name][0], self.pretrain_flags(name)
        trained = (run / SUMMARY).is_file()
        if trained:
            check_same(run, script, flags)  # a finished run of other settings is refused, not reused
        resume = ["--resume"] if list_checkpoints(run) and not trained else []
        self.run([f"scripts/pretrain_{script}.py", *flags, *resume], True, f"{run} is trained" if trained else "")

    def finetune(self, name: str) -> Path:
        b = self.budget
        out = self.root / name / "finetune" if name != "scratch" else self.root / "scratch"
        start = ["--run", str(self.root / name)] if name != "scratch" else ["--model", b.model, "--image-size",
                                                                            str(b.image_size)]
        flags = [*start, "--dataset", self.args.dataset, "--train-fraction", f"{self.args.train_fraction:g}",
                 "--dev-fraction", f"{self.args.dev_fraction:g}", "--lrs", *(f"{lr:g}" for lr in b.finetune_lrs),
                 "--seeds", str(self.args.seeds), "--batch-size", str(b.finetune_batch),
                 "--epochs", f"{b.finetune_epochs:g}", "--warmup-steps", str(b.finetune_warmup),
                 "--crop-scale", *(f"{c:g}" for c in b.crop_scale), "--output-dir", str(out)]
        results = out / FINETUNE
        done = results.is_file() and "test_accuracy" in json.loads(results.read_text())
        resume = ["--resume"] if results.is_file() and not done else []
        self.run(["eval/finetune.py", *flags, *resume], True, f"{out} is fine-tuned" if done else "")
        return out

    def probe(self, run: Path) -> None:
        """Few-shot, a linear probe and k-NN of `run`'s model on the labelled dataset, every block's features
        too, and few-shot on --transfer; each with its random-init and raw-pixel references (on by default)."""
        b = self.budget
        jobs = [("eval/fewshot.py", run / "fewshot.json", self.args.dataset,
                 ["--seeds", str(self.args.fewshot_seeds), "--max-test", str(b.fewshot_max_test), "--layers", "all"]),
                ("eval/linear_probe.py", run / "linear-probe.json", self.args.dataset, ["--layers", "all"]),
                ("eval/knn.py", run / "knn.json", self.args.dataset, ["--layers", "all"])]
        if self.args.transfer:
            jobs.append(("eval/fewshot.py", run / f"fewshot-{transfer_name(self.args.transfer)}.json",
                         self.args.transfer, ["--seeds", str(self.args.fewshot_seeds), "--image-size",
                                              str(b.image_size), "--max-test", str(b.fewshot_max_test)]))
        for script, output, dataset, extra in jobs:
            self.run([script, "--run", str(run), "--dataset", dataset, *extra, "--output", str(output)],
                     skip=f"{output} exists" if output.is_file() else "")

    def __call__(self) -> None:
        if self.view and not self.args.dry_run:
            self.view()  # once, whole; a complete one is reused
        # The comparison first (pretrain, fine-tune, probe), the ablations after it: a run cut short
        # still answers the main question.
        for name in ("mpp", "supervised"):
            self.pretrain(name)
        scratch = self.finetune("scratch")
        for name in ("mpp", "supervised"):
            self.finetune(name)
        for run in (self.root / "mpp", self.root / "supervised", scratch):
            self.probe(run)  # the references (random init, raw pixels) come with every probe
        ablations = ([name for name in pretrainings() if name not in ("mpp", "supervised")]
                     if self.args.ablations else [])
        for name in ablations:
            self.pretrain(name)
            self.probe(self.root / name)
        runs = [self.root / "mpp", self.root / "supervised", scratch, *(self.root / n for n in ablations)]
        self.run(["eval/compare.py", *map(str, runs), "--output", self.args.output])
        if not self.args.dry_run:
            (self.root / "commands.sh").write_text("# written by scripts/compare_pretraining.py\n"
                                                   + "\n".join(self.commands) + "\n")
            if self.args.keep:
                keep(runs, self.root, Path(self.args.keep))


def keep(runs: list[Path], root: Path, folder: Path) -> None:
    """Each run's small records into FOLDER/runs/<run>/ and ROOT/commands.sh into FOLDER, each written whole."""
    from mpp.core.files import copy_file, copy_records

    copied = sum(len(copy_records(run, folder / "runs" / run.name)) for run in runs if run.is_dir())
    copy_file(root / "commands.sh", folder / "commands.sh")
    print(f"kept {copied} records of {len(runs)} runs and commands.sh in {folder}")


def transfer_name(spec: str) -> str:
    from mpp.data.sources import dataset_name

    return dataset_name(spec)


def check_same(run: Path, objective: str, flags: list[str]) -> None:
    """Refuse to reuse a finished pretraining trained with other settings than this budget's."""
    from mpp.train.pretrain import parse_args

    ignored = RESUMABLE - {"max_steps", "epochs"}  # a finished run of another length is another run
    # As config.json records them (tuples as lists), so equal settings compare equal.
    wanted = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(parse_args(objective, flags)[0]).items()}
    saved = json.loads((run / CONFIG).read_text())["train"]
    changed = changed_settings(saved, wanted, ignored, flag=str)
    if changed:
        more = f"; {len(changed) - 4} more" if len(changed) > 4 else ""
        raise UsageError(f"{run} was pretrained with other settings ({'; '.join(changed[:4])}{more}): "
                         "pass another --root or the --budget it was trained with")


def build_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits",
                   help="digits | image folder (train/, test/) | .tar.gz of one | hf:NAME")
    p.add_argument("--transfer", default="", help="second dataset for a few-shot transfer check (folder or .tar.gz)")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS), help="model size and training lengths")
    number_flag(p, "--train-fraction", float, Range(0, 1, low_open=True), default=0.1,
                help="labelled subset fine-tuned on")
    number_flag(p, "--dev-fraction", float, Range(0, 1, low_open=True, high_open=True), default=0.1,
                help="of the labelled subset, held out to pick the lr")
    number_flag(p, "--seeds", int, Range(1, 1000), default=3, help="fine-tuning seeds per model")
    number_flag(p, "--fewshot-seeds", int, Range(1, 1000), default=3, help="few-shot draws per shot count")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                   help="also the other MPP targets (4×4 and L2: mpp.model.objective.TARGETS' ablation runs) and 15%% "
                   "corruption (few-shot and linear probes)")
    p.add_argument("--unlabelled", action=argparse.BooleanOptionalAction, default=False,
                   help="MPP runs pretrain on <dataset>-unlabelled, built once beside --dataset (a labelled image "
                   "folder): its images without class folders, named by hashes; the rest keep the labels. Their "
                   "in-run probe scores --dataset (one --fewshot-dataset: it wins over --transfer)")
    p.add_argument("--root", default="", help="run directories (default: runs/compare-<dataset>[-unlabelled]-<budget>)")
    p.add_argument("--output", default="", help="table and plots (default: ROOT/compare)")
    p.add_argument("--launch", default="", help="prefix for training stages, e.g. 'accelerate launch' "
                   "(default: this Python)")
    p.add_argument("--keep", default="", metavar="DIR", help="after the comparison, copy each run's records "
                   "(*.json, *.jsonl, *.md at any depth; nothing under checkpoints/, tensorboard/ or wandb/) into "
                   "DIR/runs/<run>/ and ROOT/commands.sh into DIR, each file written whole: records to commit "
                   "(default: off)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.dataset = dataset_folder(args.dataset)
    if args.transfer:
        args.transfer = dataset_folder(args.transfer)
    from mpp.data.sources import dataset_name

    args.root = args.root or f"runs/compare-{dataset_name(args.dataset)}{'-unlabelled' * args.unlabelled}-{args.budget}"
    args.output = args.output or str(Path(args.root) / "compare")
    return args


@cli_main
def main(argv: list[str] | None = None) -> None:
    Pipeline(parse_args(argv))()


if __name__ == "__main__":
    main()
