"""The library's errors are typed and said in its own terms (fields, values, classes), never in a
command line's flags; the command line that parsed the flag adds its advice (mpp.eval.probe_setup)."""
import numpy as np
import PIL.Image
import pytest

from eval import fewshot, linear_probe
from mpp.core.errors import BadField, BadInput, TooFewImages, TooFewShots, UsageError
from mpp.eval.fewshot_monitor import ProbeSet
from mpp.eval.probe_runs import FewshotDraws
from mpp.eval.probe_setup import flag_advice
from mpp.eval.probes import DEV_SPLIT_NEEDS, sample_shots, stratified_dev_split, stratified_split
from mpp.model.vit import ViTConfig, vit_config


def test_typed_errors_are_one_line_usage_errors_and_value_errors():
    error = TooFewImages("class 2", 1, 2, "a fix")
    assert isinstance(error, BadInput) and isinstance(error, UsageError) and isinstance(error, ValueError)
    assert str(error) == "class 2 has 1 training images, fewer than 2: a fix"
    assert (error.problem, error.fix) == ("class 2 has 1 training images, fewer than 2", "a fix")
    assert str(BadInput("only a problem")) == "only a problem"
    assert str(error.advised("pass --flag")) == "class 2 has 1 training images, fewer than 2: pass --flag"


@pytest.mark.parametrize("size, problem, fix, suggestion", [
    (100, "image size 100 is not divisible by the patch size 16", "use an image_size of 96 or a preset with another "
     "patch size", "96 or a preset with another patch size"),
    (8, "image size 8 is smaller than the patch size 16", "use an image_size of 16 or more", "16 or more"),
])
def test_a_bad_image_size_names_the_field_not_the_flag(size, problem, fix, suggestion):
    with pytest.raises(BadField) as e:
        vit_config("Ti/16", image_size=size)
    error = e.value
    assert (error.field, error.value, error.suggestion) == ("image_size", size, suggestion)
    assert (error.problem, error.fix, str(error)) == (problem, fix, f"{problem}: {fix}")
    assert "--" not in str(error)
    assert str(error.flag_advised("--image-size")) == f"{problem}: pass --image-size {suggestion}"  # the CLI's line


@pytest.mark.parametrize("fields", [{"dropout": 1.5}, {"attn_dropout": -0.1}, {"patch_size": 0}, {"num_classes": -1},
                                    {"ln_eps": 0.0}])
def test_every_config_error_is_a_bad_field_without_a_flag(fields):
    with pytest.raises(BadField) as e:
        ViTConfig(**fields).validate()
    assert e.value.field == next(iter(fields)) and e.value.value == next(iter(fields.values()))
    assert "--" not in str(e.value)


def test_the_other_model_errors_are_typed_and_flag_free():
    for call in (lambda: vit_config("X/16"), lambda: vit_config("Ti/16", no_such_field=1),
                 lambda: ViTConfig(embed_dim=100, num_heads=3).validate()):
        with pytest.raises(BadInput) as e:
            call()
        assert "--" not in str(e.value)


def test_a_class_too_small_is_the_facts():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(TooFewImages) as e:
        stratified_split(labels, 5, seed=0, num_classes=3, class_names=["a", "b", "c"])
    assert type(e.value) is TooFewImages
    assert (e.value.who, e.value.have, e.value.need) == ("class 1 ('b')", 3, 5)
    assert str(e.value) == "class 1 ('b') has 3 training images, fewer than 5" and e.value.fix is None


def test_too_few_shots_is_the_facts_without_a_flag():
    labels = np.array([0] * 10 + [1] * 3)
    for draw in (lambda: sample_shots(labels, 5, seed=0), lambda: FewshotDraws.draw(labels, 4, (1, 5), 2)):
        with pytest.raises(TooFewShots) as e:
            draw()
        assert (e.value.who, e.value.have, e.value.need, e.value.fix) == ("class 1", 3, 5, None)
        assert str(e.value) == "class 1 has 3 training examples, fewer than 5 shots"


def test_the_dev_split_says_why_a_class_needs_two_images_without_a_flag():
    with pytest.raises(TooFewImages) as e:
        stratified_dev_split(np.array([0, 0, 1, 1, 2]), 0.1)
    assert (e.value.who, e.value.have, e.value.need, e.value.fix) == ("class 2", 1, 2, DEV_SPLIT_NEEDS)
    assert "--" not in str(e.value)


def test_the_probe_clis_word_the_fix_in_their_flags():
    """flag_advice: the same lines the probe CLIs printed when the library worded them."""
    shots = TooFewShots("class 1 ('b')", 3, 5)
    assert str(flag_advice(shots)) == ("class 1 ('b') has 3 training examples, fewer than 5 shots: pass smaller "
                                       "--shots or a dataset with more examples per class")
    dev = TooFewImages("class 2", 1, 2, DEV_SPLIT_NEEDS)
    assert str(flag_advice(dev)) == ("class 2 has 1 training images, fewer than 2: the dev split needs one to hold "
                                     "out and one to fit on; pass a larger --max-train or a dataset with more images")
    with pytest.raises(BadField) as e:
        vit_config("Ti/16", image_size=100)
    assert str(flag_advice(e.value)) == ("image size 100 is not divisible by the patch size 16: pass --image-size 96 "
                                         "or a preset with another patch size")
    other = BadInput("unknown model preset 'X/1'", "use one of ...")
    assert flag_advice(other) is other  # nothing of theirs to add


def test_finetune_says_its_own_flag_where_it_catches_the_facts():
    """The library raises the facts; fine-tuning, which parsed --train-per-class, adds that flag."""
    from mpp.train.finetune import FinetuneConfig, split_labelled

    with pytest.raises(UsageError, match="^class 1 has 3 training images, fewer than 5: pass a smaller "
                                         "--train-per-class$") as e:
        split_labelled(np.array([0] * 10 + [1] * 3), FinetuneConfig(train_per_class=5))
    assert not isinstance(e.value, BadInput)


@pytest.mark.parametrize("cli, argv, line", [
    (fewshot, ["--shots", "500"], "fewer than 500 shots: pass smaller --shots or a dataset with more examples per "
     "class\n"),
    (fewshot, ["--model", "Ti/16", "--image-size", "100"],
     "error: image size 100 is not divisible by the patch size 16: pass --image-size 96 or a preset with another "
     "patch size\n"),
    (linear_probe, ["--max-train", "5"], "; pass a larger --max-train or a dataset with more images\n"),
])
def test_the_probe_clis_print_their_flags(cli, argv, line, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--random-init", "--model", "Micro/4", "--output", "x.json", *argv]  # a second --model wins
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and line in err and err.count("\n") == 1, err


def test_the_in_run_probe_restates_the_facts(tmp_path):
    """The draws' facts, said as the in-run probe's (its whole line: tests/test_fewshot_monitor.py)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                PIL.Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    with pytest.raises(TooFewShots) as e:
        ProbeSet.build(str(tmp_path), 8, 0)
    assert (e.value.who, e.value.have, e.value.need) == ("class 0 ('a')", 4, 5)
    assert e.value.problem == (f"the in-run few-shot probe of '{tmp_path}' needs 25 training images of every class "
                               "(class 0 ('a') has 4 training examples, fewer than 5 shots)")
