"""The ViT: presets, shapes, timm compatibility (timm is the oracle), position-embedding resampling."""
import dataclasses

import pytest
import timm.models.vision_transformer as timm_vit
import torch

from mpp.core.errors import BadField, UsageError
from mpp.model.vit import PRESETS, SIZES, ViT, resample_pos_embed, timm_kwargs, vit_config
from mpp.run.checkpoint import check_shapes, load_vit_weights


def small(name="Micro/4", **kw):
    return vit_config(name, **{"depth": 2, "image_size": 32, **kw})


@pytest.mark.parametrize(
    "name, layers, width, mlp, heads, params_m",
    [("Ti/16", 12, 192, 768, 3, 5.7), ("S/16", 12, 384, 1536, 6, 22.0), ("B/16", 12, 768, 3072, 12, 86.4),
     ("L/16", 24, 1024, 4096, 16, 304.0), ("H/14", 32, 1280, 5120, 16, 632.0)],
)
def test_paper_presets(name, layers, width, mlp, heads, params_m):
    c = vit_config(name)
    assert (c.depth, c.embed_dim, c.mlp_dim, c.num_heads, c.image_size) == (layers, width, mlp, heads, 224)
    with torch.device("meta"):  # count parameters without allocating 600M of them
        n = sum(p.numel() for p in ViT(c).parameters())
    assert abs(n / 1e6 - params_m) / params_m < 0.02


def test_every_preset_parses_and_small_image_presets_are_32px():
    for name in PRESETS:
        c = vit_config(name)
        assert c.image_size % c.patch_size == 0
    assert vit_config("Ti/4").image_size == 32 and vit_config("S/4").embed_dim == 384
    assert vit_config("Micro/4").image_size == 16  # the offline default: 8×8 digits upsampled
    assert vit_config("B/32").patch_size == 32  # any SIZE/PATCH
    assert set(SIZES) >= {"Ti", "S", "B", "L", "H"}


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/", "tiny", ""])
def test_unknown_preset_is_one_line_error(bad):
    with pytest.raises(UsageError, match="unknown model preset") as e:
        vit_config(bad)
    assert "\n" not in str(e.value) and "Ti/16" in str(e.value)


def test_image_size_not_divisible_by_patch():
    # The model names its field; the flag's words ("pass --image-size 96") are the CLI's, asserted where
    # it parses them (tests/test_fewshot.py, tests/test_library_errors.py).
    with pytest.raises(UsageError, match=r"not divisible by the patch size 16: use an image_size of 96") as e:
        vit_config("Ti/16", image_size=100)
    assert isinstance(e.value, BadField) and (e.value.field, e.value.value) == ("image_size", 100)
    assert e.value.suggestion.startswith("96 ") and "--" not in str(e.value)
    model = ViT(small())
    with pytest.raises(UsageError, match="not divisible"):
        model(torch.rand(1, 3, 30, 30))


def test_shapes_and_every_parameter_gets_a_gradient():
    c = small(num_classes=7)
    model = ViT(c)
    x = torch.randn(3, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats["tokens"].shape == (3, c.num_patches + 1, c.embed_dim)
    assert feats["pre_logits"].shape == (3, c.embed_dim)
    logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # num_classes=0: no head, the model returns pre-logits
    assert ViT(small(num_classes=0))(x).shape == (3, c.embed_dim)


def test_keeping_some_tokens_computes_the_same_values_and_gradients():
    c = small(num_classes=5)
    torch.manual_seed(0)
    model = ViT(c)
    x = torch.randn(3, 3, 32, 32)
    keep = torch.tensor([[0, 5, 2], [7, 1, 0], [3, 3, 9]])  # (B, n): any tokens, any order, repeats
    full = model.forward_features(x)["tokens"]  # (B, N+1, D)
    part = model.forward_tokens(model.embed_patches(x), keep=keep)  # (B, n, D)
    torch.testing.assert_close(part, full.gather(1, keep[..., None].expand(-1, -1, c.embed_dim)), rtol=1e-5, atol=1e-5)
    grads = []
    for logits in (model.head(full[:, 0]), model(x)):  # forward() keeps only the class token
        model.zero_grad()
        logits.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(model(x), model.head(full[:, 0]), rtol=1e-5, atol=1e-5)
    for name in grads[0]:
        # float rounding of sums over other shapes: up to 3e-6 on gradients of order 1–10 (40 seeds tried)
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name, image", [("Micro/4", 32), ("Ti/16", 224)])
def test_timm_state_dict_round_trip_and_equal_outputs(name, image):
    c = vit_config(name, depth=2, num_classes=10, image_size=image)
    ours = ViT(c).eval()
    theirs = timm_vit.VisionTransformer(**timm_kwargs(c)).eval()
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    # timm → ours, strict: same function
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x)["tokens"], theirs.forward_features(x), rtol=1e-5, atol=1e-5)
    # ours → timm, strict, after changing our weights
    torch.manual_seed(1)
    ours2 = ViT(c).eval()
    theirs.load_state_dict(ours2.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours2(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_loading_a_224_checkpoint_into_a_384_model_resamples_positions():
    c224 = vit_config("Ti/16", depth=1)
    c384 = dataclasses.replace(c224, image_size=384)
    src = ViT(c224)
    with torch.no_grad():  # positions that vary linearly along rows: resampling must keep the layout
        rows = torch.arange(14.0).repeat_interleave(14)  # row index of each of the 14×14 patches
        src.pos_embed[0, 1:, :] = rows[:, None]
        src.pos_embed[0, 0, :] = 42.0
    dst = ViT(c384)
    dst.load_state_dict(src.state_dict())  # strict, resampled 14×14 → 24×24
    pos = dst.pos_embed[0].detach()
    assert pos.shape == (1 + 24 * 24, 192)
    assert torch.all(pos[0] == 42.0)  # the class token's embedding is kept as is
    grid = pos[1:, 0].reshape(24, 24)
    assert torch.allclose(grid[:, 0], grid[:, 23], atol=1e-4)  # constant along columns
    assert torch.all(grid[1:, 0] >= grid[:-1, 0] - 1e-4)  # increasing down the rows
    assert grid[0, 0] < 0.5 and grid[23, 0] > 12.5
    assert dst(torch.randn(1, 3, 384, 384)).shape == (1, c384.num_classes)
    # and the model also runs at a new resolution directly, resampling on the fly
    assert src.forward_features(torch.randn(1, 3, 384, 384))["tokens"].shape == (1, 577, 192)


def test_resample_keeps_same_grid_identical():
    pos = torch.randn(1, 65, 16)
    torch.testing.assert_close(resample_pos_embed(pos, 8), pos)


def test_checkpoint_of_another_shape_names_the_parameters():
    model = ViT(small())
    other = ViT(vit_config("Ti/4", depth=2, image_size=16)).state_dict()
    with pytest.raises(UsageError) as e:
        load_vit_weights(model, other, "ckpt.pt", hint="pass --model Ti/4")
    msg = str(e.value)
    assert "\n" not in msg and "ckpt.pt holds a model of another shape" in msg
    assert "pos_embed" in msg and "pass --model Ti/4" in msg
    deeper = ViT(vit_config("Micro/4", depth=3, image_size=32)).state_dict()
    with pytest.raises(UsageError, match=r"unexpected blocks\.2\."):
        check_shapes(model, deeper, "x")
