"""Labels read from files (mpp.data.labels): checked against the classes where a split is built, the
class count inferred without a class list bounded by the data before anything is sized by it, and
the splits reconciled for whatever needs labels, refused in one line, writing nothing; MPP, which
ignores labels, still trains on data whose images are partly labelled -1 (Hugging Face's "no label")."""
import re
import resource
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers.refusals import label_needing, run_in_process
from helpers.runs import run_script, threads_kept
from helpers.shard_files import png, write_tar

from mpp.core.errors import UsageError, one_line
from mpp.data.datasets import DatasetInfo
from mpp.data.labels import NO_LABEL, inferred_classes
from mpp.data.sources import load_split
from mpp.train.pretrain import main

# A few steps of a 2-block Micro at 8 px on 24 to 27 images.
TINY = ["--model", "Micro/4", "--image-size", "8", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
        "--warmup-steps", "1", "--max-steps", "2", "--save-every", "100"]
HUGE = 10**12


def noise(rng) -> PIL.Image.Image:
    return PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """--dataset specs of tiny labelled sources whose labels are wrong, or right but not reconciled."""
    root, rng, found = tmp_path_factory.mktemp("labels"), np.random.default_rng(0), {}

    def hub(name: str, train: list[int], test: list[int] | None = None, names: list[str] | None = None) -> None:
        # cast, not from_dict(features=...): a ClassLabel is then not checked, as when read from a file
        label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
        features = datasets.Features({"image": datasets.Image(), "label": label})
        splits = {"train": train} if test is None else {"train": train, "test": test}
        datasets.DatasetDict({s: datasets.Dataset.from_dict({"image": [noise(rng) for _ in labels], "label": labels})
                              .cast(features) for s, labels in splits.items()}).save_to_disk(str(root / name))
        found[name] = f"hf:{root / name}"

    hub("huge", [0, 1] * 10 + [HUGE], [0, 1] * 3)
    datasets.Dataset.from_dict({"image": [noise(rng) for _ in range(21)], "label": [0, 1] * 10 + [HUGE]}).cast(
        datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ).to_parquet(root / "huge.parquet")
    found["huge-parquet"] = f"hf:{root / 'huge.parquet'}"
    hub("all-unlabelled", [-1] * 20, [-1] * 4)
    hub("partly-unlabelled", [0, 1, 2, 3] * 6 + [-1] * 3, [0, 1, 2, 3] * 2)
    hub("test-wider", [0, 1, 2, 3] * 6, list(range(8)) * 2)  # no class list: train's labels give 4 classes
    hub("class-without-training-image", [0, 1, 2, 3] * 6, list(range(8)) * 2, names=[f"c{c}" for c in range(8)])
    hub("beyond-the-list", [0, 1] * 10 + [5], [0, 1], names=["a", "b"])
    hub("one-class", [0] * 24, [0] * 4, names=["a", "b"])
    shards = root / "huge-shards"
    shards.mkdir()
    for split, n in (("train", 40), ("test", 6)):
        labels = [HUGE - 1 if split == "train" and i == 3 else i % 2 for i in range(n)]
        write_tar(shards / f"{split}-000000.tar", [m for i, label in enumerate(labels)
                                                   for m in ((f"{split}{i}.png", png(rng)), (f"{split}{i}.cls",
                                                                                           str(label).encode()))])
    found["huge-shards"] = f"shards:{shards}"
    return found


# ---------------------------------------------------------------- values: checked where a split is built

def test_the_class_count_inferred_without_a_class_list_is_bounded_by_the_labelled_images():
    def name(row: int) -> str:
        return f"row {row}"

    assert inferred_classes(np.array([2, 0, 1, -1]), name, "fix") == ["0", "1", "2"]  # 3 labelled: 0..2
    assert inferred_classes(np.array([-1, -1]), name, "fix") is None  # -1 throughout: unlabelled
    with pytest.raises(UsageError, match=r"^row 1 has label 3: .* 4 classes are more than its 3 labelled training"):
        inferred_classes(np.array([0, 3, 1, -1]), name, "fix")  # {0, 1, 3}: class 2 would be empty
    with pytest.raises(UsageError, match=f"row 1 has label {HUGE:,}: "):
        inferred_classes(np.array([0, HUGE]), name, "fix")


@pytest.mark.parametrize("source, where", [
    ("huge", "row 20 of split 'train'"), ("huge-parquet", "row 20 of split 'train'"),
    ("huge-shards", "sample 'train3' of shard '")])
def test_a_huge_label_without_a_class_list_names_its_row_and_is_refused_by_every_split(specs, hf_cache, source, where):
    for split in ("train", "test"):
        if source == "huge-parquet" and split == "test":
            continue  # a parquet file is a train split
        with pytest.raises(UsageError, match="without a class list the classes are 0..the largest label") as e:
            load_split(specs[source], split)
        assert str(e.value).startswith(where) and "\n" not in str(e.value)
        assert f"has label {HUGE - (source == 'huge-shards'):,}" in str(e.value)


def test_hub_labels_outside_the_classes_are_refused_naming_the_row_label_and_count(specs, hf_cache):
    train, info = load_split(specs["test-wider"], "train")  # train alone is consistent
    assert info.class_names == ["0", "1", "2", "3"] and info.class_counts == (6, 6, 6, 6)
    with pytest.raises(UsageError) as e:
        load_split(specs["test-wider"], "test")
    assert str(e.value).startswith(f"row 4 of split 'test' of dataset '{specs['test-wider']}' has label 4, outside "
                                   "the 4 classes the train split's labels give (0..3) "
                                   "(as are 7 more of its 16 labels)")
    with pytest.raises(UsageError, match="row 20 of split 'train' .* has label 5, outside the 2 classes its ClassLabel "
                                         r"lists \(0..1\): fix the label"):
        load_split(specs["beyond-the-list"], "train")


def test_a_test_split_is_read_by_the_train_splits_classes(tmp_path, hf_cache):
    rng = np.random.default_rng(0)

    def split(names: list[str] | None, labels: list[int] | None) -> datasets.Dataset:
        rows = {"image": [noise(rng) for _ in range(4)], **({"label": labels} if labels else {})}
        features = {"image": datasets.Image(), **({"label": datasets.ClassLabel(names=names)} if labels else {})}
        return datasets.Dataset.from_dict(rows).cast(datasets.Features(features))

    datasets.DatasetDict({"train": split(["a", "b"], [0, 1, 0, 1]), "test": split(["b", "a"], [0, 1, 1, 0])}
                         ).save_to_disk(str(tmp_path / "renamed"))
    with pytest.raises(UsageError, match="^split 'test' of dataset .* names other classes than its train split"):
        load_split(f"hf:{tmp_path / 'renamed'}", "test")
    datasets.DatasetDict({"train": split(None, None), "test": split(["a", "b"], [0, 1, 0, 1])}).save_to_disk(
        str(tmp_path / "test-only-labels"))
    test, info = load_split(f"hf:{tmp_path / 'test-only-labels'}", "test")  # numbers of no train class: unlabelled
    assert not info.labelled and {test[i][1] for i in range(4)} == {NO_LABEL}


def write_labelled_folder(root: Path, labels: list, rng) -> str:
    """A save_to_disk dataset of one train split with these integer labels."""
    datasets.Dataset.from_dict({"image": [noise(rng) for _ in labels], "label": labels}).cast_column(
        "image", datasets.Image()).save_to_disk(str(root))
    return f"hf:{root}"


@pytest.mark.parametrize("labels, needle", [
    ([0, 1, -5, 1], "has label -5, not a class number (0 or more, or -1: no label)"),
    ([0, 1, None, 1], "has no label: give every image its class number (or -1: no label)")])
def test_a_hub_label_that_is_no_class_number_is_one_line(tmp_path, hf_cache, labels, needle):
    spec = write_labelled_folder(tmp_path / "d", labels, np.random.default_rng(0))
    with pytest.raises(UsageError, match=f"^row 2 of split 'train' of dataset '{re.escape(spec)}' {re.escape(needle)}"):
        load_split(spec, "train")


def shard_with(tmp_path: Path, text: bytes, first: bool = False) -> str:
    """Two shards and a class list; one sample's `cls` member is `text` (the first sample's, or a later one's)."""
    rng = np.random.default_rng(0)
    write_tar(tmp_path / "train-000000.tar", [("a0.png", png(rng)), ("a0.cls", b"0"), ("a1.png", png(rng)),
                                              ("a1.cls", b"1")])
    samples = [("b0", text if first else b"1"), ("b1", b"0"), ("b2", b"1" if first else text)]
    write_tar(tmp_path / "train-000001.tar", [m for key, label in samples
                                              for m in ((f"{key}.png", png(rng)), (f"{key}.cls", label))])
    (tmp_path / "classes.txt").write_text("a\nb\n")
    return f"shards:{tmp_path}"


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
@pytest.mark.parametrize("text, problem", [
    (b"-3", "a negative number"), (b"1.5", "not an integer"), (b"True", "not an integer"), (b"nan", "not an integer"),
    (b"99999999999999999999999", "too large for a class number (over 64 bits)")])
def test_a_cls_member_that_is_no_class_number_is_one_line_naming_the_member(tmp_path, hf_cache, streaming, text,
                                                                             problem):
    for first in (True, False):  # the first sample of a shard is read when the set is built; a later one as read
        folder, key = tmp_path / f"first-{first}", "b0" if first else "b2"
        folder.mkdir()
        with pytest.raises(UsageError) as e:
            data, _ = load_split(shard_with(folder, text, first), "train", streaming=streaming)
            list(data)
        message, shard = str(e.value), folder / "train-000001.tar"
        assert "\n" not in message and str(shard) in message, message
        # Its bytes, when read from the tar (or datasets could not decode it); else its number, decoded by
        # datasets and checked against the class list as the sample is read.
        as_read = f"shard '{shard}': sample '{key}' has the label {text[:20]!r}, {problem}: "
        as_decoded = f"sample '{key}' of shard '{shard}' has label {text.decode()}, " + (
            "not a class number (0 or more)" if text.startswith(b"-") else "outside the 2 classes listed (0..1)")
        assert message.startswith(as_read) or (text.lstrip(b"-").isdigit() and message.startswith(as_decoded)), message


@pytest.mark.parametrize("text", [b"-3", b"99999999999999999999999"])
def test_a_bad_label_met_by_a_streaming_loader_worker_is_one_line(tmp_path, hf_cache, text):
    stream, _ = load_split(shard_with(tmp_path, text), "train", streaming=True)
    with pytest.raises(UsageError) as e:
        list(torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2))
    line = one_line(e.value)  # what the command line prints: the worker's traceback is dropped
    assert "b2" in line and "train-000001.tar" in line and "Traceback" not in line, str(e.value)


# ---------------------------------------------------------------- -1 and reconciliation

def test_hub_labels_all_minus_one_are_an_unlabelled_split(specs, hf_cache):
    for split in ("train", "test"):
        data, info = load_split(specs["all-unlabelled"], split)
        assert not info.labelled and "are all -1" in info.layout
        assert {data[i][1] for i in range(len(data))} == {NO_LABEL}


def test_images_labelled_minus_one_among_labelled_ones_are_counted_and_refused_when_labels_are_needed(specs, hf_cache):
    data, info = load_split(specs["partly-unlabelled"], "train")
    assert info.labelled and info.class_counts == (6, 6, 6, 6) and info.unlabelled_items == 3
    assert [data[i][1] for i in range(24, 27)] == [NO_LABEL] * 3  # what MPP reads: it ignores labels
    with pytest.raises(UsageError, match=r"^3 of the 27 images in split 'train' of dataset .* are labelled -1 \(no "
                                         r"label\): keep only the labelled ones .*; the fix$"):
        data.require_labels("the fix")


def test_require_labels_refuses_one_class_and_test_classes_without_a_training_image():
    train = DatasetInfo("d", ["a", "b", "c"], "a layout", "train", (5, 5, 0))
    assert train.require_labels("fix") is train
    with pytest.raises(UsageError, match=r"^split 'train' of dataset 'd' has images of 1 class \('a'\), and a "
                                         r"classifier needs 2 or more \(a layout\): fix$"):
        DatasetInfo("d", ["a", "b"], "a layout", "train", (5, 0)).require_labels("fix")
    with pytest.raises(UsageError, match="has images of 1 class, and"):  # a stream: its class list alone
        DatasetInfo("d", ["a"], "a layout", "train").require_labels("fix")
    test = DatasetInfo("d", ["a", "b", "c"], "a layout", "test", (1, 1, 2))
    with pytest.raises(UsageError, match=r"^split 'test' of dataset 'd' has 2 images of class 2 \('c'\), which has no "
                                         r"image in split 'train' \(1 such classes\), so a classifier"):
        test.require_labels("fix", train=train)
    DatasetInfo("d", ["a", "b", "c"], "", "test", (1, 0, 0)).require_labels("fix", train=train)  # a subset is fine
    DatasetInfo("d", ["a", "b", "c"], "", "test").require_labels("fix", train=train)  # a stream: checked as read


def hub_stream(tmp_path: Path, labels: list[int], names: list[str]):
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"image": [noise(rng) for _ in labels], "label": labels}).cast(features).save_to_disk(
        str(tmp_path / "d"))
    return load_split(f"hf:{tmp_path / 'd'}", "train", streaming=True)[0]


def test_a_streams_labels_are_checked_as_read_and_minus_one_refused_once_labels_are_required(tmp_path, hf_cache):
    stream = hub_stream(tmp_path / "a", [0, 1, -1, 1], ["a", "b"])
    assert [label for _, label in stream] == [0, 1, NO_LABEL, 1]  # MPP reads it
    stream.require_labels("the fix")
    with pytest.raises(UsageError) as e:  # also in the loader workers started after require_labels
        list(torch.utils.data.DataLoader(stream, batch_size=1, num_workers=2))
    assert one_line(e.value).startswith("an image of split 'train' of dataset ") and one_line(e.value).endswith(
        "is labelled -1 (no label): keep only the labelled images (datasets' Dataset.filter), or pretrain by MPP, "
        "which ignores labels; the fix")
    with pytest.raises(UsageError, match=r"has label 7, outside the 2 classes of the dataset \(0..1\)"):
        list(hub_stream(tmp_path / "b", [0, 7], ["a", "b"]))


# ---------------------------------------------------------------- what each command accepts

def refusals(spec: str, out: Path) -> dict[str, list[str]]:
    """Each label-needing command (tests/helpers/refusals.py) at this file's tiny sizes."""
    return label_needing(spec, out, train=tuple(TINY), tune=("--image-size", "8"),
                         probe=("--image-size", "8", "--device", "cpu"))


def command_line(name: str, spec: str, out: Path) -> list[str]:
    """The command `name` of `refusals`, or "mpp" (MPP pretraining), on `spec`, writing below `out`."""
    if name == "mpp":
        return ["scripts/pretrain_mpp.py", "--dataset", spec, *TINY, "--output-dir", str(out / "run")]
    return refusals(spec, out)[name]


NEEDLES = {"partly-unlabelled": "3 of the 27 images in split 'train' of dataset",
           "class-without-training-image": "has 2 images of class 4 ('c4'), which has no image in split 'train'",
           "one-class": "has images of 1 class ('a'), and a classifier needs 2 or more",
           "all-unlabelled": "has no labels (a Hugging Face dataset whose train labels in 'label' are all -1"}


@pytest.mark.parametrize("source", NEEDLES)
def test_every_label_needing_command_refuses_labels_it_cannot_learn_or_score(specs, hf_cache, tmp_path, capsys,
                                                                              source):
    out = tmp_path / "out"  # each command's output goes below it: none may be created
    for command, argv in refusals(specs[source], out).items():
        with threads_kept(), pytest.raises(SystemExit) as e:
            run_in_process(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert e.value.code == 2 and len(errors) == 1 and NEEDLES[source] in errors[0], (command, err[-2000:])
        assert "Traceback" not in err and not out.exists(), command


def one_error(done, needle: str) -> bool:
    """Exit 2, one `error:` line, the last, holding `needle`, and no traceback."""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return (done.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0] and needle in errors[0]
            and "Traceback" not in done.stderr)


def at_most_8_gb() -> None:
    """The subprocess's address space capped (imports map about 4.5 GB): a class list of 10^12 cannot fit."""
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize("command, source", [("mpp", "huge-shards"), ("linear_probe", "huge-parquet")])
def test_a_huge_label_through_the_command_line_is_one_line_in_bounded_memory(specs, hf_cache, tmp_path, monkeypatch,
                                                                             command, source):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CUDA context would map more than the cap by itself
    done = run_script(*command_line(command, specs[source], tmp_path / "out"), preexec_fn=at_most_8_gb, timeout=120)
    assert one_error(done, f"has label {HUGE - (source == 'huge-shards'):,}: without a class list"), done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, source, needle", [
    ("supervised", "partly-unlabelled", "are labelled -1 (no label)"),
    ("fewshot", "all-unlabelled", "has no labels"),
    ("knn", "class-without-training-image", "which has no image in split 'train'"),
    ("finetune", "test-wider", "outside the 4 classes the train split's labels give (0..3)")])
def test_unreconciled_labels_through_the_command_line_are_one_line(specs, hf_cache, tmp_path, command, source, needle):
    done = run_script(*command_line(command, specs[source], tmp_path / "out"))
    assert one_error(done, needle), done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, described", [("partly-unlabelled", "4 classes"),
                                               ("all-unlabelled", "unlabelled (a Hugging Face dataset whose train")])
def test_mpp_pretrains_on_images_labelled_minus_one(specs, hf_cache, tmp_path, capsys, source, described):
    """MPP ignores labels: images labelled -1, some or all, are images to pretrain on."""
    with threads_kept():
        main("mpp", command_line("mpp", specs[source], tmp_path)[1:])
    assert f"dataset {specs[source]}: {described}" in capsys.readouterr().out
    assert (tmp_path / "run" / "summary.json").is_file()
