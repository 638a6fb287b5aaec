"""The ViT built on our Triton kernels against the same ViT on PyTorch's ops.

Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1).
Which kernels a run uses is decided by mpp.model.kernel_policy (tests/test_kernel_policy.py); here the model
is built with a fixed `Kernels`, as a run's model is.
"""
import importlib.util

import pytest
import torch

from mpp.model.objective import MPPObjective
from mpp.model.ops import TORCH, Kernels
from mpp.model.vit import ViT, vit_config

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OURS = Kernels("triton", "triton", "triton")


@needs_triton
def test_public_api_names_the_functions_not_the_submodules():
    import triton_kernels.attention
    import triton_kernels.layer_norm  # noqa: F401
    from triton_kernels import attention, layer_norm

    assert callable(attention) and callable(layer_norm)


def tiny_vit(kernels, num_classes=5):
    # head dim 32, N = 17 tokens (a tail shorter than any block), odd batch
    torch.manual_seed(0)
    return ViT(vit_config("Micro/4", depth=2, embed_dim=64, num_heads=2, mlp_dim=128, image_size=16,
                          num_classes=num_classes), kernels).to(DEVICE)


@needs_triton
def test_vit_on_triton_kernels_equals_vit_on_pytorch():
    images = torch.randn(3, 3, 16, 16, device=DEVICE)
    results = {}
    for name, kernels in (("torch", TORCH), ("triton", OURS)):
        model = tiny_vit(kernels)
        logits = model(images)
        logits.square().sum().backward()
        results[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@needs_triton
def test_mpp_step_on_triton_kernels():
    losses = {}
    for name, kernels in (("torch", TORCH), ("triton", OURS)):
        obj = MPPObjective(tiny_vit(kernels, num_classes=0)).to(DEVICE)
        torch.manual_seed(1)
        loss, _ = obj(torch.rand(4, 3, 16, 16, device=DEVICE))
        loss.backward()
        losses[name] = (loss.item(), obj.mask_token.grad.clone())
    assert losses["triton"][0] == pytest.approx(losses["torch"][0], rel=1e-5)
    torch.testing.assert_close(losses["triton"][1], losses["torch"][1], rtol=1e-3, atol=1e-6)


@needs_triton
def test_attention_output_reshape_is_a_view():
    """Ours writes (B, N, H, hd) memory order: the block's transpose + reshape copies nothing."""
    from mpp.model.ops import triton_attention

    q, k, v = torch.randn(3, 2, 2, 17, 32, device=DEVICE).unbind(0)  # (B, H, N, hd) each
    out = triton_attention(q, k, v)
    merged = out.transpose(1, 2).reshape(2, 17, 64)  # (B, N, D)
    assert merged.data_ptr() == out.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_vit_training_step_on_gpu():
    model = ViT(vit_config("S/16", depth=2, num_classes=10), OURS).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    forward = torch.compile(model, fullgraph=True)  # the backward graph is compiled too (AOTAutograd)

    def step(images, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        return loss

    images, labels = torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        loss = step(images, labels)
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
