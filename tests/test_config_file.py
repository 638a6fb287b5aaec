"""`--config FILE` (mpp.core.config.Parser) and what a run's config.json records of how it was started
(mpp.core.provenance): a run repeated from its own config.json ends with bitwise its weights, flags given
override the file, a bad file or value is one line with exit code 2, and config.json holds the file,
the command line, the git commit and the library versions."""
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import ENV, FAST, REPO, final_weights, run_script, threads_kept

from eval import fewshot
from eval import finetune as finetune_entry
from mpp.core.config import Invocation, config_file_in
from mpp.core.provenance import PACKAGES, git_commit, provenance
from mpp.train import finetune as ft
from mpp.train.pretrain import main, parse_args

# A's settings differ from the defaults, so a repeat that fell back on them would differ.
A_FLAGS = [*FAST, "--max-steps", "4", "--lr", "0.002", "--seed", "5", "--corrupt-rate", "0.25", "--no-hflip"]
# `accelerate launch` with one process, as a user would repeat a run (fp32, as plain python runs on CPU).
LAUNCH_1 = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """Run a (plain python), then b = `accelerate launch scripts/pretrain_mpp.py --config a/config.json
    --output-dir b` (~13 s together)."""
    root = tmp_path_factory.mktemp("repeat")
    a, b = root / "a", root / "b"
    done = run_script("scripts/pretrain_mpp.py", "--output-dir", str(a), *A_FLAGS)
    assert done.returncode == 0, done.stderr[-2000:]
    b_args = ["--config", str(a / "config.json"), "--output-dir", str(b)]
    again = subprocess.run([*LAUNCH_1, "scripts/pretrain_mpp.py", *b_args], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stderr[-2000:]
    return a, b, b_args


def config_of(run) -> dict:
    return json.loads((run / "config.json").read_text())


def test_a_run_repeated_from_its_config_json_ends_with_bitwise_its_weights(repeated):
    a, b, _ = repeated
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    ca, cb = config_of(a), config_of(b)
    assert cb["train"] == {**ca["train"], "output_dir": str(b)}  # every setting from the file, the flag overriding
    assert cb["mpp"] == ca["mpp"] and ca["mpp"]["corrupt_rate"] == 0.25 and ca["train"]["hflip"] is False


def test_config_json_records_the_file_and_the_command_line(repeated):
    a, b, b_args = repeated
    ca, cb = config_of(a), config_of(b)
    assert ca["config_file"] is None and ca["command_line"] == ["--output-dir", str(a), *A_FLAGS]
    assert cb["config_file"] == str(a / "config.json") and cb["command_line"] == b_args


def expected_commit() -> str:
    """HEAD of the checkout holding mpp, "+dirty" when a tracked file differs (asked of git another way)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def test_config_json_records_the_commit_and_the_versions(repeated):
    a, _, _ = repeated
    recorded = config_of(a)
    assert recorded["commit"] == expected_commit()
    assert recorded["versions"] == {"python": platform.python_version(),
                                    **{p: importlib.metadata.version(p) for p in PACKAGES}}


def test_resume_records_what_resumed_it_and_refuses_other_settings(repeated, tmp_path, capsys):
    a, b, _ = repeated
    run = tmp_path / "b"
    shutil.copytree(b, run)
    argv = ["--config", str(a / "config.json"), "--output-dir", str(run), "--resume"]
    # a flag that makes it another run is refused, the file's settings standing for the rest (in this process)
    with threads_kept(), pytest.raises(SystemExit) as e:
        main("mpp", [*argv, "--lr", "0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--lr 0.002 → 0.01" in err[0], err
    done = run_script("scripts/pretrain_mpp.py", *argv, "--max-steps", "6")
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = config_of(run)["resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4 and resumed[0]["max_steps"] == 6
    assert resumed[0]["config_file"] == str(a / "config.json")
    assert resumed[0]["command_line"][-2:] == ["--max-steps", "6"]
    assert resumed[0]["commit"] == expected_commit()
    assert resumed[0]["versions"]["torch"] == importlib.metadata.version("torch")


def test_flags_given_override_the_file(repeated):
    a, _, _ = repeated
    config, mpp = parse_args("mpp", ["--config", str(a / "config.json"), "--lr", "0.01", "--hflip"])
    assert (config.lr, config.hflip, config.seed, config.max_steps, mpp.corrupt_rate) == (0.01, True, 5, 4, 0.25)
    assert config.output_dir == str(a)  # from the file: a new run needs --output-dir (the old one is refused)
    # the supervised entry point takes the "train" section and ignores MPP's
    sup, _ = parse_args("supervised", ["--config", str(a / "config.json")])
    assert (sup.objective, sup.lr, sup.seed) == ("supervised", 0.002, 5)


def test_a_length_given_on_the_command_line_wins_over_the_files_other_length(tmp_path):
    """A run's config.json records both --max-steps and --epochs; the one typed is obeyed, whichever it is."""
    by_epochs = tmp_path / "epochs.yaml"
    by_epochs.write_text("epochs: 4\nmax-steps: 1500\n")
    config, _ = parse_args("mpp", ["--config", str(by_epochs), "--max-steps", "1"])
    assert (config.epochs, config.max_steps) == (0.0, 1)  # was 4 epochs: --max-steps silently ignored
    config, _ = parse_args("mpp", ["--config", str(by_epochs), "--epochs=2"])
    assert (config.epochs, config.max_steps) == (2.0, 1500)
    assert parse_args("mpp", ["--config", str(by_epochs)])[0].epochs == 4.0  # neither typed: the file's
    by_steps = tmp_path / "steps.yaml"
    by_steps.write_text("steps: 30\nepochs: 3\n")
    tuned = ft.parse_args(["--config", str(by_steps), "--steps", "7"])
    assert (tuned.epochs, tuned.steps) == (0.0, 7)


@pytest.mark.parametrize("name, text", [
    ("flags.json", '{"lr": 0.003, "max-steps": 40, "crop_scale": [0.3, 1.0], "hflip": false, "target": "l2"}'),
    ("flags.yaml", 'lr: 0.003\nmax-steps: 40\ncrop_scale: [0.3, 1.0]\nhflip: false\ntarget: l2\n'),
    ("flags.yml", 'lr: "3e-3"\nmax_steps: "40"\ncrop-scale: [0.3, 1]\nhflip: no\ntarget: "l2"\n'),
    # A YAML merge's keys may be overridden: not a key set twice.
    ("merged.yaml", '<<: {lr: 0.1, max-steps: 40}\nlr: 0.003\ncrop_scale: [0.3, 1.0]\nhflip: false\ntarget: l2\n'),
])
def test_a_flat_file_of_flags_sets_the_defaults(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    config, mpp = parse_args("mpp", ["--config", str(path)])
    assert (config.lr, config.max_steps, config.crop_scale, config.hflip, mpp.target) == (
        0.003, 40, (0.3, 1.0), False, "l2")
    assert parse_args("mpp", ["--max-steps", "7", "--config", str(path)])[0].max_steps == 7  # wherever the flag stands


def one_line(capsys, argv, parse=lambda argv: parse_args("mpp", argv)) -> str:
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


BAD_FILES = [  # file name, content (bytes: written as is), what the one line says besides the file's name
    ("nan.json", '{"lr": NaN}', "key 'lr': --lr nan is not finite: pass a number > 0"),
    ("range.yaml", "corrupt-rate: 1.5\n",
     "key 'corrupt-rate': --corrupt-rate 1.5 is out of range: pass a number in (0, 1]"),
    ("int.json", '{"max_steps": 2.5}', "key 'max_steps': --max-steps '2.5' is not a whole number"),
    ("text.yaml", "max-steps: many\n", "--max-steps 'many' is not a whole number"),
    ("bool.json", '{"hflip": 1}', "--hflip takes true or false"),
    ("yamlbool.yaml", "kernel-cache: off\n", "--kernel-cache False is a boolean, not text: quote the value"),
    ("pair.json", '{"crop-scale": [0.5]}', "--crop-scale takes 2 values, not 1"),
    ("null.json", '{"lr": null}', "--lr is null"),
    ("unknown.json", '{"lr": 0.1, "lrr": 0.1}', "key 'lrr' is not a flag of"),
    ("objective.json", '{"objective": "supervised"}', "key 'objective' is not a flag of"),
    ("negated.json", '{"no-hflip": true}', "key 'no-hflip' is --no-hflip's flag, not a setting: write 'hflip: false'"),
    ("twice.json", '{"max-steps": 3, "max_steps": 4}', "sets --max-steps a second time"),
    # json and yaml keep a repeated key's last value without a word
    ("repeated.json", '{"lr": 0.1, "max-steps": 3, "lr": 0.2}', "sets key 'lr' more than once: keep one of them"),
    ("repeated.yaml", "lr: 0.1\nmax-steps: 3\nlr: 0.2\n", "sets key 'lr' (lines 1 and 3) more than once: keep one"),
    ("section/config.json", '{"train": {"lr": 0.1, "seed": 1, "lr": 0.2}, "mpp": {}}', "sets key 'train.lr' more than"),
    ("nested.json", '{"config": "other.json"}', "key 'config' is another --config"),
    ("list.json", "[1, 2]", "holds a list, not a mapping of flags"),
    ("empty.yaml", "", "is empty"),
    ("broken.json", '{"lr": 0.1', "is not valid JSON"),
    ("broken.yaml", "lr: [0.1\n", "is not valid YAML at line 2"),
    ("binary.json", b"\xff\xfe\x00", "cannot be read (UnicodeDecodeError"),
    ("flags.toml", "lr = 0.1", "unknown format"),
    ("typo/config.json", '{"train": {"lr": 0.1, "max_stepz": 3}, "mpp": {}}',  # an edited run's config.json
     "key 'train.max_stepz' is no setting a run records: fix its name or drop it"),
    ("finetune/config.json", '{"train": {"objective": "finetune", "model": "Ti/4"}, "finetune": {"lrs": [0.1]}}',
     "is a fine-tune's config.json, which records no flags of"),
]


@pytest.mark.parametrize("name, content, expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_one_line_naming_it(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line(capsys, ["--config", str(path)])
    assert line.startswith(f"error: --config {path}") and expected in line, line


def test_a_missing_file_a_missing_value_and_a_choice(tmp_path, capsys):
    assert "no such file" in one_line(capsys, ["--config", str(tmp_path / "none.json")])
    assert "--config: expected one argument" in one_line(capsys, ["--config"])
    choice = tmp_path / "probe.json"
    choice.write_text('{"kernels": "fast", "shots": 5}')  # a probe's flag with choices, and a list flag given one value
    assert "key 'kernels': --kernels 'fast' is not one of auto, triton, torch" in one_line(
        capsys, ["--config", str(choice)], fewshot.build_parser().parse_args)
    choice.write_text('{"shots": 5}')
    assert fewshot.build_parser().parse_args(["--config", str(choice)]).shots == [5]


def test_a_bad_value_in_the_file_through_the_command_line_changes_nothing(tmp_path):
    bad = tmp_path / "flags.yaml"
    bad.write_text("max-steps: 4\nwarmup-steps: -1\n")
    out = tmp_path / "run"
    done = run_script("scripts/pretrain_mpp.py", "--config", str(bad), "--output-dir", str(out))
    assert done.returncode == 2 and done.stdout == "" and not out.exists()
    assert done.stderr.strip().splitlines() == [
        f"error: --config {bad}, key 'warmup-steps': --warmup-steps -1 is out of range: pass a number >= 0"]


def test_a_repeated_key_through_the_command_line_changes_nothing(tmp_path):
    flags = tmp_path / "flags.yaml"
    flags.write_text("max-steps: 4\nlr: 0.001\nseed: 3\nlr: 0.01\n")  # an lr appended below the old one
    out = tmp_path / "run"
    done = run_script("scripts/pretrain_mpp.py", "--config", str(flags), "--output-dir", str(out))
    assert done.returncode == 2 and done.stdout == "" and not out.exists()
    assert done.stderr.strip().splitlines() == [
        f"error: --config {flags} sets key 'lr' (lines 2 and 4) more than once: keep one of them"]


def test_a_finetune_reads_its_own_section_and_records_how_it_started(tmp_path, capsys):
    flags = tmp_path / "ft.yaml"
    flags.write_text("model: Micro/4\nsteps: 2\nbatch-size: 32\nwarmup-steps: 1\nnum-workers: 0\nlrs: 0.01\n"
                     "seeds: 1\ntrain-per-class: 10\ndev-fraction: 0.25\n")
    out = tmp_path / "ft"
    argv = ["--config", str(flags), "--output-dir", str(out)]
    with threads_kept():
        finetune_entry.main(argv)
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["finetune"]["lrs"] == [0.01] and recorded["finetune"]["train_per_class"] == 10
    assert recorded["config_file"] == str(flags) and recorded["command_line"] == argv
    assert recorded["commit"] == expected_commit() and set(PACKAGES) < set(recorded["versions"])
    # its config.json repeats it: from the "finetune" section, not from the summary in "train" (whose
    # dataset is "digits" where the fine-tune's flag was empty)
    config = ft.parse_args(["--config", str(out / "config.json"), "--steps", "3"])
    assert recorded["train"]["dataset"] == "digits" and config.dataset == ""
    assert (config.model, config.steps, config.lrs, config.train_per_class) == ("Micro/4", 3, (0.01,), 10)
    assert config.output_dir == str(out)
    # a pretraining run's config.json holds no fine-tuning flags
    capsys.readouterr()  # the fine-tune's progress bars
    pretraining = tmp_path / "pretraining.json"
    pretraining.write_text(json.dumps({"train": {"lr": 0.1}, "mpp": {}}))
    assert "is a pretraining run's config.json, which records no flags of" in one_line(
        capsys, ["--config", str(pretraining)], ft.parse_args)


def test_invocation_reads_the_config_flag_as_argparse_does(tmp_path):
    assert config_file_in(["--lr", "1", "--config=a.json"]) == "a.json"
    assert config_file_in(["--config", "a.json", "--config", "b.yaml"]) == "b.yaml"
    assert config_file_in(["--config"]) is None and config_file_in([]) is None
    got = Invocation.of(["--config", "a.json", "--lr", "1"])
    assert got.config_file == str(Path.cwd() / "a.json")  # where the file was, whatever the run's directory
    assert got.record() == {"config_file": got.config_file, "command_line": ["--config", "a.json", "--lr", "1"]}
    assert Invocation(None, None).record() == {"config_file": None, "command_line": None}


def test_provenance_of_a_checkout(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "r.json").write_text("{}")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert provenance(repo)["commit"] == head
    (repo / "runs").mkdir()
    (repo / "runs" / "new.txt").write_text("untracked")  # untracked files are no change of code
    assert provenance(repo)["commit"] == head
    (repo / "benchmarks" / "results" / "r.json").write_text('{"a": 1}')
    assert provenance(repo)["commit"] == head + "+dirty"  # for a run, every tracked file counts
    assert git_commit(repo) == head[:len(git_commit(repo).split("+")[0])]  # benchmarks: not their own results
    (repo / "code.py").write_text("x = 2\n")
    assert provenance(repo)["commit"] == head + "+dirty" and git_commit(repo).endswith("+dirty")
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance(outside)["commit"] == "unknown"
    assert provenance(outside)["versions"]["torch"] == importlib.metadata.version("torch")
    assert all(v is None or isinstance(v, str) for v in provenance(outside)["versions"].values())
    assert sys.version.startswith(provenance(outside)["versions"]["python"])


def test_a_required_flag_may_come_from_the_file(tmp_path, capsys):
    from mpp.core.config import Parser

    parser = Parser(prog="export.py")
    parser.add_argument("--run", required=True)
    parser.add_argument("--output", required=True)
    (tmp_path / "f.json").write_text('{"run": "runs/a"}')
    args = parser.parse_args(["--config", str(tmp_path / "f.json"), "--output", "out"])
    assert (args.run, args.output) == ("runs/a", "out")
    assert "required: --output" in one_line(capsys, ["--config", str(tmp_path / "f.json")], parser.parse_args)
    assert all(a.required for a in parser._actions if a.dest in ("run", "output"))  # restored after the parse
