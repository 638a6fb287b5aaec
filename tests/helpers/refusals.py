"""The commands that need labels, as a user types them, and their entry points called in-process: what
the tests of unlabelled data (tests/test_unlabelled.py) and of unreconciled labels (tests/test_labels.py)
expect each of them to refuse."""
from pathlib import Path


def label_needing(spec: str, out: Path, train: tuple[str, ...] = (), tune: tuple[str, ...] = (),
                  probe: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Each label-needing command on `spec`, as argv after `python`, writing (if it wrote) only under `out`;
    `train`, `tune`, `probe`: extra flags of the pretraining, fine-tuning and probe commands."""
    probe_args = ["--model", "Micro/4", "--random-init", *probe, "--dataset", spec]
    return {
        "supervised": ["scripts/pretrain_supervised.py", "--dataset", spec, *train, "--output-dir", str(out / "run")],
        "fewshot-every": ["scripts/pretrain_mpp.py", "--dataset", spec, *train, "--fewshot-every", "5",
                          "--output-dir", str(out / "run")],
        "finetune": ["eval/finetune.py", "--model", "Micro/4", *tune, "--dataset", spec, "--output-dir",
                     str(out / "tune")],
        "fewshot": ["eval/fewshot.py", *probe_args, "--output", str(out / "probe" / "fewshot.json")],
        "linear_probe": ["eval/linear_probe.py", *probe_args, "--output", str(out / "probe" / "linear-probe.json")],
        "knn": ["eval/knn.py", *probe_args, "--output", str(out / "probe" / "knn.json")],
    }


def run_in_process(argv: list[str]) -> None:
    """The entry point argv[0] names, called with the rest (it raises SystemExit as the script would exit)."""
    import eval.fewshot
    import eval.finetune
    import eval.knn
    import eval.linear_probe
    from mpp.train.pretrain import main

    entry = {"scripts/pretrain_supervised.py": lambda rest: main("supervised", rest),
             "scripts/pretrain_mpp.py": lambda rest: main("mpp", rest),
             "eval/finetune.py": eval.finetune.main, "eval/fewshot.py": eval.fewshot.main,
             "eval/linear_probe.py": eval.linear_probe.main, "eval/knn.py": eval.knn.main}
    entry[argv[0]](argv[1:])
