"""MPP: corruption statistics, targets on hand-made images, loss on corrupted patches only, and a
new target added in one place (one entry of the table) trained end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import FAST, read_metrics

from mpp.core.errors import UsageError
from mpp.model.objective import (
    TARGETS,
    MPPConfig,
    MPPObjective,
    SupervisedObjective,
    Target,
    corrupt_patches,
    downsample_target,
    mean_color_target,
    patchify,
    register_target,
)
from mpp.model.vit import ViT, vit_config


def distinct_patches(B, N, D=4):
    """Every patch embedding different from every other one, so replacements can be traced."""
    return torch.arange(B * N * D, dtype=torch.float32).reshape(B, N, D)


def test_exact_corruption_count_per_image():
    for rate, N in [(0.5, 64), (0.15, 64), (0.5, 49), (1.0, 16)]:
        c = corrupt_patches(distinct_patches(32, N), torch.zeros(1, 1, 4), MPPConfig(corrupt_rate=rate))
        chosen, kind = c.chosen, c.kind
        n = round(rate * N)
        assert chosen.shape == (32, n)
        assert ((kind != 0).sum(1) == n).all()
        # the indices and the kinds agree
        assert (kind.gather(1, chosen) != 0).all()


def test_split_80_10_10_and_never_replaced_by_itself():
    torch.manual_seed(0)
    B, N, D = 256, 64, 4
    patches = distinct_patches(B, N, D)
    mask_token = torch.full((1, 1, D), -1.0)
    c = corrupt_patches(patches, mask_token, MPPConfig())
    x, kind = c.patches, c.kind
    n_corrupt = B * N // 2
    frac = {k: (kind == k).sum().item() / n_corrupt for k in (1, 2, 3)}
    assert abs(frac[1] - 0.8) < 0.015 and abs(frac[2] - 0.1) < 0.01 and abs(frac[3] - 0.1) < 0.01
    assert (x[kind == 1] == -1.0).all()  # the [mask] embedding
    same = (x == patches).all(-1)  # (B, N) unchanged embedding
    assert same[kind == 0].all() and same[kind == 3].all()
    # random replacements: another patch's embedding of the batch, never the patch's own
    flat = patches.reshape(B * N, D)
    replaced = x[kind == 2]  # (R, D)
    src = ((replaced[:, None, :] == flat[None]).all(-1)).float().argmax(1)  # (R,) flat index of the source
    assert ((replaced[:, None, :] == flat[None]).all(-1)).any(1).all()
    own = torch.arange(B * N).reshape(B, N)[kind == 2]
    assert (src != own).all()
    # other images are used as sources too ("a random other patch of the batch")
    assert ((src // N) != (own // N)).float().mean() > 0.9
    # the recorded source says the same: own index when unchanged, the traced one when random, B·N for [mask]
    assert torch.equal(c.source[kind == 2], src)
    assert (c.source[kind == 1] == B * N).all()
    own_all = torch.arange(B * N).reshape(B, N)
    assert torch.equal(c.source[(kind == 0) | (kind == 3)], own_all[(kind == 0) | (kind == 3)])
    assert c.kind.dtype == torch.int8 and c.source.dtype == torch.long
    assert torch.equal(c.chosen, c.chosen.sort(1).values)


def test_never_itself_even_with_two_patches():
    for _ in range(50):
        c = corrupt_patches(distinct_patches(1, 2), torch.zeros(1, 1, 4),
                            MPPConfig(corrupt_rate=1.0, mask_prob=0.0, random_prob=1.0, keep_prob=0.0))
        x, kind = c.patches, c.kind
        assert (kind == 2).all()
        assert torch.equal(x[0, 0], distinct_patches(1, 2)[0, 1]) and torch.equal(x[0, 1], distinct_patches(1, 2)[0, 0])


def solid(colors, P):
    """An image of a row of solid P×P patches with the given RGB colours. → (1, 3, P, P·len)"""
    return torch.cat([torch.tensor(c, dtype=torch.float32)[:, None, None].expand(3, P, P) for c in colors], 2)[None]


def test_mean_color_target_on_known_colours():
    images = solid([(0, 0, 0), (1, 1, 1), (0.99, 0.0, 0.5), (0.124, 0.125, 0.874), (0.875, 0.3, 0.7)], P=4)
    t = mean_color_target(images, 4)
    assert t.dtype == torch.long and t.shape == (1, 5)
    # levels min(floor(8·mean), 7) → r·64 + g·8 + b
    assert t.tolist() == [[0, 511, 7 * 64 + 0 + 4, 0 * 64 + 1 * 8 + 6, 7 * 64 + 2 * 8 + 5]]
    # a patch half black, half white has mean 0.5 → level 4 per channel
    half = torch.zeros(1, 3, 4, 4)
    half[..., :2] = 1.0
    assert mean_color_target(half, 4).item() == 4 * 64 + 4 * 8 + 4
    # fewer bits: 1 bit per channel → 8 classes
    assert mean_color_target(images, 4, bits=1).tolist() == [[0, 7, 5, 1, 5]]


def test_downsample_target_cells():
    P = 8
    img = torch.zeros(1, 3, P, P)
    img[:, 0, :, 4:] = 1.0  # right half red
    img[:, 2, 6:, :] = 1.0  # bottom quarter blue
    t = downsample_target(img, P, cells=4)
    assert t.shape == (1, 1, 16)
    cells = t.reshape(4, 4)
    red, blue, both = 7 * 64, 7, 7 * 64 + 7
    assert cells.tolist() == [[0, 0, red, red], [0, 0, red, red], [0, 0, red, red], [blue, blue, both, both]]


def test_downsample_cells_stay_inside_their_patch_when_p_is_not_a_multiple():
    P = 14  # H/14: 14 pixels do not split into 4 equal cells
    img = torch.zeros(1, 3, P, 2 * P)
    img[:, :, :, P:] = 1.0  # second patch white, first black
    t = downsample_target(img, P, cells=4)
    assert (t[0, 0] == 0).all() and (t[0, 1] == 511).all()


def test_patchify_order_matches_patch_embed_order():
    images = torch.rand(2, 3, 8, 12)
    p = patchify(images, 4)  # (B, 6, 48)
    assert p.shape == (2, 6, 48)
    # patch (row 1, col 2) is the 6th, pixels in (row, col, channel) order
    torch.testing.assert_close(p[:, 5].reshape(2, 4, 4, 3), images[:, :, 4:8, 8:12].permute(0, 2, 3, 1))
    assert mean_color_target(images, 4).shape == (2, 6)


def tiny_vit():
    return ViT(vit_config("Micro/4", depth=1, embed_dim=32, num_heads=2, mlp_dim=64, image_size=16, num_classes=0))


def test_loss_covers_corrupted_patches_only():
    torch.manual_seed(0)
    obj = MPPObjective(tiny_vit())
    images = torch.rand(4, 3, 16, 16)
    base_targets = obj.targets(images)  # (4, 16)
    torch.manual_seed(123)
    # the same draws the objective will make: which patches get corrupted
    chosen = corrupt_patches(torch.zeros(4, 16, 32), obj.mask_token, obj.config).chosen
    corrupted = torch.zeros(4, 16, dtype=torch.bool).scatter_(1, chosen, True)

    def loss_with(targets):
        obj.targets = lambda _: targets
        torch.manual_seed(123)
        return obj(images)[0].item()

    changed_elsewhere = torch.where(corrupted, base_targets, (base_targets + 17) % 512)
    changed_inside = torch.where(corrupted, (base_targets + 17) % 512, base_targets)
    assert loss_with(changed_elsewhere) == loss_with(base_targets)
    assert loss_with(changed_inside) != loss_with(base_targets)


@pytest.mark.parametrize("target", ["mean_color", "downsample", "l2"])
def test_each_target_trains(target):
    torch.manual_seed(0)
    obj = MPPObjective(tiny_vit(), MPPConfig(target=target))
    images = torch.rand(8, 3, 16, 16)
    opt = torch.optim.Adam(obj.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same corruption every step: the loss must go down
        loss, metrics = obj(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0
    assert losses[-1] < 0.7 * losses[0]
    assert ("accuracy" in metrics) == (target != "l2")


def test_supervised_objective():
    vit = ViT(vit_config("Micro/4", depth=1, image_size=16, num_classes=3))
    loss, metrics = SupervisedObjective(vit)(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert loss.ndim == 0 and 0 <= metrics["accuracy"] <= 1


@pytest.mark.parametrize(
    "kw, match",
    [({"corrupt_rate": 0.0}, "--corrupt-rate 0 is out of range"), ({"corrupt_rate": 1.5}, "corrupt-rate 1.5 is out"),
     ({"mask_prob": 0.7}, "sum to 1"), ({"random_prob": -0.1, "keep_prob": 0.3}, "--random-prob -0.1 is out of range"),
     ({"mask_prob": float("nan")}, "--mask-prob nan is not finite"), ({"cells": 0}, "--cells 0 is out of range"),
     ({"target": "pixels"}, "unknown MPP target")],
)
def test_bad_mpp_config(kw, match):
    with pytest.raises(UsageError, match=match):
        MPPConfig(**kw).validate()


def test_corruption_gradients_are_bitwise_reproducible():
    # The [mask] row is gathered thousands of times: its gradient must sum in a fixed order, or no
    # run (and no resume) would repeat bitwise on CPU.
    torch.manual_seed(0)
    patches = torch.randn(32, 16, 64, requires_grad=True)
    mask = torch.randn(1, 1, 64, requires_grad=True)
    grad = torch.randn(32, 16, 64)
    seen = []
    for _ in range(20):
        patches.grad = mask.grad = None
        x = corrupt_patches(patches, mask, MPPConfig(), generator=torch.Generator().manual_seed(1)).patches
        x.backward(grad)
        seen.append((patches.grad.clone(), mask.grad.clone()))
    assert all(torch.equal(p, seen[0][0]) and torch.equal(m, seen[0][1]) for p, m in seen)


@pytest.fixture
def toy_target():
    """A new target, in one place: is each patch brighter than mid-grey (2 classes)? Removed afterwards."""
    def bright(images, P, config):  # (B, C, H, W) → (B, N) in {0, 1}
        return (F.avg_pool2d(images.float().mean(1, keepdim=True), P).flatten(1) > 0.5).long()

    def accuracy(pred, target, loss):
        return {"accuracy": (pred.argmax(-1) == target).float().mean().detach()}

    toy = register_target(Target("toy", "toy", "is the patch brighter than mid-grey, 2 classes",
                                 head_width=lambda vit, config: 2, target=bright, loss=F.cross_entropy,
                                 metrics=accuracy))
    yield toy
    del TARGETS[toy.name]


def test_a_target_added_in_one_place_trains(toy_target, tmp_path):
    from mpp.train.pretrain import build_parser, main

    assert "toy: is the patch brighter than mid-grey" in build_parser("mpp").format_help()
    run = tmp_path / "toy"
    main("mpp", ["--output-dir", str(run), *FAST, "--target", "toy", "--max-steps", "2"])
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["mpp"]["target"] == "toy" and summary["steps"] == 2
    losses = [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(summary["eval"]["loss"]) and 0 <= summary["eval"]["accuracy"] <= 1
    with pytest.raises(ValueError, match="already registered"):
        register_target(toy_target)


def test_the_table_is_what_every_reader_sees():
    assert list(TARGETS) == ["mean_color", "downsample", "l2"]  # the order of --help and of the ablations
    assert [t.arm for t in TARGETS.values()] == [None, "mpp-4x4", "mpp-l2"]
    with pytest.raises(UsageError, match="use one of mean_color, downsample, l2"):
        MPPConfig(target="toy").validate()
