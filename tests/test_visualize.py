"""Pictures of a run: each target's rendering on known inputs, the prediction mosaic (its layout,
and that drawing it changes no generator, parameter or mode), the attention maps (recomputed
tokens equal the model's, rows sum to 1, rollout of uniform attention is uniform), and
eval/visualize.py on tiny trained runs."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.runs import FAST, REPO, run_script

from mpp.core.errors import UsageError
from mpp.data.sources import build_dataset, normalize
from mpp.eval.attention_maps import (
    attention_mosaic,
    attention_pass,
    attention_weights,
    class_attention,
    rollout,
)
from mpp.eval.visualize import (
    GAP,
    GREY,
    KEPT_BORDER,
    RANDOM_BORDER,
    held_out_images,
    prediction_mosaic,
    tile,
)
from mpp.model.objective import (
    KEPT,
    MASKED,
    RANDOM,
    TARGETS,
    MPPConfig,
    MPPObjective,
    Target,
    downsample_target,
    mean_color_target,
    patchify,
    register_target,
)
from mpp.model.vit import ViT, vit_config


def tiny_vit(depth=2, size=16):
    return ViT(vit_config("Micro/4", depth=depth, embed_dim=32, num_heads=2, mlp_dim=64, image_size=size,
                          num_classes=0))


# --- rendering, per target ---------------------------------------------------------------------


def test_mean_color_renders_the_class_colour():
    entry, config = TARGETS["mean_color"], MPPConfig()
    classes = torch.tensor([0, 511, 7 * 64 + 0 * 8 + 4, 1 * 64 + 2 * 8 + 3])
    pixels = entry.render(classes, 4, config)  # (4, 4, 4, 3)
    assert pixels.shape == (4, 4, 4, 3)
    expected = torch.tensor([[0.5, 0.5, 0.5], [7.5, 7.5, 7.5], [7.5, 0.5, 4.5], [1.5, 2.5, 3.5]]) / 8  # (l + 0.5) / L
    torch.testing.assert_close(pixels, expected[:, None, None, :].expand(-1, 4, 4, -1), rtol=0, atol=0)
    # decode takes the argmax; a patch of a level-centre colour renders back to itself
    logits = F.one_hot(classes, 512).float() * 5
    assert torch.equal(entry.decode(logits, config), classes)
    images = expected.T[None, :, None, :].repeat_interleave(4, 3).repeat_interleave(4, 2)  # (1, 3, 4, 16)
    torch.testing.assert_close(entry.render(mean_color_target(images, 4)[0], 4, config), patchify(images, 4)
                               .reshape(4, 4, 4, 3))
    assert TARGETS["mean_color"].render(torch.tensor([5]), 4, MPPConfig(bits=1)).unique().tolist() == [0.25, 0.75]


def test_downsample_renders_each_cell_in_its_colour():
    entry, config = TARGETS["downsample"], MPPConfig()
    P = 8
    img = torch.zeros(1, 3, P, P)
    img[:, 0, :, 4:] = 1.0  # right half red
    img[:, 2, 6:, :] = 1.0  # bottom quarter blue
    classes = downsample_target(img, P)[0]  # (1, 16)
    pixels = entry.render(classes, P, config)  # (1, P, P, 3)
    assert pixels.shape == (1, P, P, 3)
    # level 7's centre is 15/16, level 0's is 1/16: the picture is the image, in level centres
    torch.testing.assert_close(pixels[0], (img[0].permute(1, 2, 0) * 14 + 1) / 16)
    # decode: one argmax per cell
    logits = F.one_hot(classes, 512).float().reshape(1, -1)  # (1, 16·512)
    assert torch.equal(entry.decode(logits, config), classes)


def test_downsample_cells_render_when_p_is_not_a_multiple():
    config, P = MPPConfig(), 14  # H/14: 4 cells do not divide 14 pixels
    classes = torch.arange(16)[None] * 31  # (1, 16) sixteen different colours
    pixels = TARGETS["downsample"].render(classes, P, config)[0]  # (P, P, 3)
    cell = (torch.arange(P) * 4) // P  # nearest: pixel i shows cell floor(i·4/P)
    colors = torch.stack([(classes[0] // 64), (classes[0] // 8) % 8, classes[0] % 8], -1).float().add(0.5) / 8
    expected = colors.reshape(4, 4, 3)[cell[:, None], cell[None, :]]  # (P, P, 3)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


def test_l2_renders_the_pixels_clamped():
    entry, config = TARGETS["l2"], MPPConfig(target="l2")
    images = torch.rand(2, 3, 8, 8)
    target = patchify(images, 4).flatten(0, 1)  # (8, 48)
    torch.testing.assert_close(entry.render(entry.decode(target, config), 4, config),
                               images.reshape(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(8, 4, 4, 3))
    wild = torch.tensor([[-1.0, 2.0, 0.25] * 16])  # (1, 48)
    assert entry.render(wild, 4, config).unique().tolist() == [0.0, 0.25, 1.0]


@pytest.fixture
def toy_target():
    """A target registered without rendering (it trains, it cannot be drawn). Removed afterwards."""
    toy = register_target(Target("toy_draw", "toy", "2 classes", head_width=lambda vit, c: 2,
                                 target=lambda images, P, c: torch.zeros(len(images), (images.shape[-1] // P) ** 2,
                                                                         dtype=torch.long),
                                 loss=F.cross_entropy, metrics=lambda pred, target, loss: {}))
    yield toy
    del TARGETS[toy.name]


def test_a_target_without_rendering_is_one_usage_error(toy_target):
    objective = MPPObjective(tiny_vit(), MPPConfig(target="toy_draw"))
    with pytest.raises(UsageError, match="has no rendering: give its Target a decode and a render"):
        prediction_mosaic(objective, torch.rand(2, 3, 16, 16))


# --- the prediction mosaic ---------------------------------------------------------------------


def panel(mosaic, row, col, size=16, scale=4):
    """The (3, size, size) panel at (row, col) of a mosaic, back at its own resolution."""
    top, left = GAP + row * (size * scale + GAP), GAP + col * (size * scale + GAP)
    return mosaic[:, top:top + size * scale:scale, left:left + size * scale:scale]


@pytest.mark.parametrize("target", ["mean_color", "downsample", "l2"])
def test_mosaic_layout(target):
    torch.manual_seed(0)
    objective = MPPObjective(tiny_vit(), MPPConfig(target=target))
    images = torch.rand(3, 3, 16, 16)
    mosaic = prediction_mosaic(objective, images, seed=1)
    assert mosaic.shape == (3, 3 * 64 + 4 * GAP, 4 * 64 + 5 * GAP)  # 16 px panels enlarged 4×
    assert mosaic.dtype == torch.float32 and 0 <= mosaic.min() and mosaic.max() <= 1
    for b in range(3):
        torch.testing.assert_close(panel(mosaic, b, 0), images[b])  # the original
    assert torch.equal(mosaic, prediction_mosaic(objective, images, seed=1))  # a seed draws one picture
    assert not torch.equal(mosaic, prediction_mosaic(objective, images, seed=2))


def test_the_input_panel_shows_what_the_model_saw():
    torch.manual_seed(0)
    objective = MPPObjective(tiny_vit(), MPPConfig(mask_prob=1.0, random_prob=0.0, keep_prob=0.0))
    images = torch.rand(2, 3, 16, 16)
    mosaic = prediction_mosaic(objective, images, seed=0)
    with torch.no_grad():
        _, _, corruption = objective.predict(images, generator=torch.Generator().manual_seed(0))
    assert (corruption.kind.unique() == torch.tensor([0, MASKED])).all()
    for b in range(2):
        seen = patchify(panel(mosaic, b, 1)[None], 4)[0]  # (16, 48)
        original = patchify(images[b:b + 1], 4)[0]
        masked = corruption.kind[b] == MASKED
        assert (seen[masked] == GREY).all()
        torch.testing.assert_close(seen[~masked], original[~masked])
        # the prediction panels dim the patches they do not predict
        torch.testing.assert_close(patchify(panel(mosaic, b, 3)[None], 4)[0][~masked], 0.3 * original[~masked])


def test_random_and_kept_patches_are_framed():
    torch.manual_seed(0)
    objective = MPPObjective(tiny_vit(), MPPConfig(mask_prob=0.0, random_prob=0.5, keep_prob=0.5, corrupt_rate=1.0))
    images = torch.rand(2, 3, 16, 16)
    mosaic = prediction_mosaic(objective, images, seed=0)
    with torch.no_grad():
        kind = objective.predict(images, generator=torch.Generator().manual_seed(0))[2].kind[0]  # (16,)
    assert set(kind.tolist()) == {RANDOM, KEPT}
    corner = panel(mosaic, 0, 1)[:, ::4, ::4].permute(1, 2, 0).reshape(16, 3)  # each patch's top-left pixel
    assert (corner[kind == RANDOM] == torch.tensor(RANDOM_BORDER)).all()
    assert (corner[kind == KEPT] == torch.tensor(KEPT_BORDER)).all()


def test_drawing_changes_no_generator_parameter_or_mode():
    torch.manual_seed(0)
    objective = MPPObjective(tiny_vit(), MPPConfig())
    objective.train()
    objective.vit.blocks[1].eval()  # a mixed state comes back as it was, module by module
    modes = [m.training for m in objective.modules()]
    params = {k: v.clone() for k, v in objective.state_dict().items()}
    images = torch.rand(4, 3, 16, 16)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    prediction_mosaic(objective, images, seed=7)
    attention_mosaic(objective.vit, images)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[1], strict=True))
    assert random.getstate() == states[2]
    assert [m.training for m in objective.modules()] == modes
    assert all(torch.equal(v, params[k]) for k, v in objective.state_dict().items())
    assert all(p.grad is None for p in objective.parameters())
    # so a training step after drawing is the step it would have been without
    torch.manual_seed(5)
    loss_after = objective(images)[0]
    torch.manual_seed(5)
    assert torch.equal(loss_after, objective(images)[0])


def test_training_with_a_picture_at_each_step_ends_bitwise_the_same():
    images = torch.rand(4, 3, 16, 16)

    def train(draw: bool) -> dict:
        torch.manual_seed(0)
        objective = MPPObjective(tiny_vit(), MPPConfig())
        opt = torch.optim.AdamW(objective.parameters(), lr=1e-2)
        for _ in range(3):
            loss = objective(images)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if draw:  # what the trainer does at each evaluation
                prediction_mosaic(objective, images[:2], seed=0)
        return objective.state_dict()

    plain, drawn = train(False), train(True)
    assert all(torch.equal(plain[k], drawn[k]) for k in plain)


def test_held_out_images_are_the_same_at_every_call():
    dataset, _ = build_dataset("digits", "test", 16, train=False)
    state = torch.get_rng_state()
    first = held_out_images(dataset, 8)
    assert first.shape == (8, 3, 16, 16) and first.dtype == torch.float32 and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, held_out_images(dataset, 8)) and torch.equal(torch.get_rng_state(), state)
    assert held_out_images(dataset, 10_000).shape[0] == len(dataset)  # all of a small set
    with pytest.raises(UsageError, match="pass at least 1"):
        held_out_images(dataset, 0)


# --- attention maps ----------------------------------------------------------------------------


def test_recomputed_attention_belongs_to_the_model():
    torch.manual_seed(0)
    vit = tiny_vit(depth=3)
    for p in vit.parameters():  # weights away from the init, so every part of the block matters
        p.data.add_(torch.randn_like(p) * 0.1)
    vit.train()
    images = torch.rand(4, 3, 16, 16)
    tokens, weights = attention_pass(vit, images)
    assert vit.training  # its mode comes back
    with torch.no_grad():
        vit.eval()
        expected = vit.forward_tokens(vit.embed_patches(normalize(images)))  # (B, N+1, D)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    assert len(weights) == 3 and all(w.shape == (4, 2, 17, 17) for w in weights)
    for w in weights:
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 2, 17))
    assert class_attention(weights).shape == rollout(weights).shape == (4, 4, 4)
    # another resolution: the position embeddings are resampled as the model does
    big = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(attention_pass(vit, big)[0], vit.forward_tokens(vit.embed_patches(normalize(big))),
                                   rtol=1e-5, atol=1e-5)


def test_rollout_of_uniform_attention_is_uniform():
    torch.manual_seed(0)
    vit = tiny_vit(depth=3)
    D = vit.config.embed_dim
    with torch.no_grad():
        for block in vit.blocks:  # q = k = 0: every logit 0, every row uniform
            block.attn.qkv.weight[:2 * D] = 0
            block.attn.qkv.bias[:2 * D] = 0
    weights = attention_weights(vit, torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(weights[0], torch.full_like(weights[0], 1 / 17))
    torch.testing.assert_close(class_attention(weights), torch.full((2, 4, 4), 1 / 17))
    r = rollout(weights)
    torch.testing.assert_close(r, torch.full_like(r, r[0, 0, 0].item()))
    # (U + I)/2 per layer, three layers: the class row gives each patch (1 - 1/8)/17
    torch.testing.assert_close(r, torch.full_like(r, (1 - 0.5**3) / 17))
    # attention to oneself only: the rollout stays on the class token, no patch gets any
    eye = [torch.eye(17).expand(2, 2, 17, 17)] * 2
    assert (rollout(eye) == 0).all()


def test_attention_mosaic_layout():
    torch.manual_seed(0)
    mosaic = attention_mosaic(tiny_vit(), torch.rand(2, 3, 16, 16))
    assert mosaic.shape == (3, 2 * 64 + 3 * GAP, 3 * 64 + 4 * GAP)
    assert 0 <= mosaic.min() and mosaic.max() <= 1
    assert tile([[torch.zeros(3, 100, 100)]]).shape == (3, 100 + 2 * GAP, 100 + 2 * GAP)  # big images stay 1×


# --- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step MPP run and a 3-step supervised run of Micro/4 on the digits."""
    from mpp.train.pretrain import main

    root = tmp_path_factory.mktemp("visualize")
    for objective in ("mpp", "supervised"):
        main(objective, ["--output-dir", str(root / objective), *FAST, "--max-steps", "3"])
    return root


def test_cli_writes_both_pictures_and_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = run_script("eval/visualize.py", "--run", str(runs / "mpp"), "--images", "3", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    out = runs / "mpp" / "visualize"
    assert (out / "predictions.png").is_file() and (out / "attention.png").is_file()
    assert "orange border" in done.stdout  # the legend
    import PIL.Image

    assert PIL.Image.open(out / "predictions.png").size == (4 * 64 + 5 * GAP, 3 * 64 + 4 * GAP)
    events = EventAccumulator(str(runs / "mpp" / "tensorboard" / "visualize"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"visualize/predictions", "visualize/attention"}
    assert [e.step for e in events.Images("visualize/predictions")] == [3]  # the checkpoint's step


def test_cli_bad_flag_is_one_line():
    done = run_script("eval/visualize.py", "--images", "0")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --images 0 is out of range") and len(done.stderr.splitlines()) == 1


def load_cli():
    """eval/visualize.py as a module (an entry point is imported by nothing but tests)."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("eval_visualize", REPO / "eval" / "visualize.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(argv, capsys):
    """(exit code, captured output) of a CLI call that ends by exiting."""
    with pytest.raises(SystemExit) as exit_:
        load_cli().main(argv)
    return exit_.value.code, capsys.readouterr()


def test_a_supervised_run_draws_attention_only(runs, tmp_path, capsys):
    code, out = cli(["--run", str(runs / "supervised"), "--what", "predictions"], capsys)
    assert code == 2 and len(out.err.splitlines()) == 1
    assert out.err.startswith("error: ") and "pass --what attention" in out.err
    written = load_cli().main(["--run", str(runs / "supervised"), "--output", str(tmp_path / "pics"), "--images", "2"])
    assert set(written) == {"attention"} and (tmp_path / "pics" / "attention.png").is_file()
    assert "note: " in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--run", "no/such/run"], "does not exist"), (["--seed", "nan"], "--seed 'nan' is not a whole number"),
    (["--images", "1.5"], "--images '1.5' is not a whole number")])
def test_cli_bad_input(argv, match, capsys):
    code, out = cli(argv, capsys)
    assert code == 2 and len(out.err.splitlines()) == 1 and match in out.err, out.err
