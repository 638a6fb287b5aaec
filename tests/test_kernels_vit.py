"""The gate, and the ViT on our Triton kernels against the same ViT on PyTorch ops.

Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1).
"""
import importlib.util

import pytest
import torch

from mpp.errors import UsageError
from mpp.model import ViT, vit_config
from mpp.objective import MPPObjective
from triton_kernels import gate

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_gate_modes_and_reasons(monkeypatch):
    x = torch.zeros(2, 8)
    monkeypatch.setenv("MPP_KERNELS", "torch")
    assert not gate.use_triton("layer_norm", x)
    assert gate.decisions()["layer_norm"] == "torch: MPP_KERNELS=torch"
    monkeypatch.setenv("MPP_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not gate.use_triton("layer_norm", x)  # CPU without the interpreter: PyTorch, and it says why
    assert "CPU tensors" in gate.decisions()["layer_norm"]
    monkeypatch.setenv("MPP_KERNELS", "triton")  # forced: a fallback is an error, not a silent switch
    with pytest.raises(UsageError, match="cannot use the Triton kernel: CPU tensors"):
        gate.use_triton("layer_norm", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MPP_KERNELS", "auto")
    assert not gate.use_triton("attention", x, lambda: "head dim 7 is not supported")
    assert gate.decisions()["attention"] == "torch: head dim 7 is not supported"
    monkeypatch.setenv("MPP_KERNELS", "triton")
    monkeypatch.setenv("MPP_KERNELS_OFF", "add_layer_norm, attention")  # by name: PyTorch, and no error
    assert not gate.use_triton("add_layer_norm", x) and not gate.use_triton("attention", x)
    assert gate.decisions()["add_layer_norm"] == "torch: MPP_KERNELS_OFF names it"
    assert gate.use_triton("layer_norm", x)
    monkeypatch.delenv("MPP_KERNELS_OFF")
    monkeypatch.setenv("MPP_KERNELS", "fast")
    with pytest.raises(UsageError, match="auto, triton or torch"):
        gate.kernel_mode()


@needs_triton
def test_public_api_names_the_functions_not_the_submodules():
    import triton_kernels.attention  # noqa: F401  (a submodule import must not shadow the function)
    import triton_kernels.layer_norm  # noqa: F401
    from triton_kernels import attention, layer_norm

    assert callable(attention) and callable(layer_norm)


def test_triton_missing_falls_back(monkeypatch):
    monkeypatch.setenv("MPP_KERNELS", "auto")
    monkeypatch.setattr(gate, "TRITON_MISSING", "triton is not installed (pip install triton)")
    assert not gate.use_triton("attention", torch.zeros(1))
    assert "not installed" in gate.decisions()["attention"]


def tiny_vit(num_classes=5):
    # head dim 32, N = 17 tokens (a tail shorter than any block), odd batch
    torch.manual_seed(0)
    return ViT(vit_config("Micro/4", depth=2, embed_dim=64, num_heads=2, mlp_dim=128, image_size=16,
                          num_classes=num_classes)).to(DEVICE)


@needs_triton
def test_vit_on_triton_kernels_equals_vit_on_pytorch(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    images = torch.randn(3, 3, 16, 16, device=DEVICE)
    results = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MPP_KERNELS", mode)
        model = tiny_vit()
        logits = model(images)
        logits.square().sum().backward()
        results[mode] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        on = "triton" + (" (interpreter)" if DEVICE == "cpu" else "")
        assert gate.decisions() == {"attention": on, "layer_norm": on, "add_layer_norm": on} \
            if mode == "triton" else all(v.startswith("torch") for v in gate.decisions().values())
    (ref_logits, ref_grads), (logits, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@needs_triton
def test_mpp_step_on_triton_kernels(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    losses = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("MPP_KERNELS", mode)
        obj = MPPObjective(tiny_vit(num_classes=0)).to(DEVICE)
        torch.manual_seed(1)
        loss, _ = obj(torch.rand(4, 3, 16, 16, device=DEVICE))
        loss.backward()
        losses[mode] = (loss.item(), obj.mask_token.grad.clone())
    assert losses["triton"][0] == pytest.approx(losses["torch"][0], rel=1e-5)
    torch.testing.assert_close(losses["triton"][1], losses["torch"][1], rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_vit_training_step_on_gpu(monkeypatch):
    monkeypatch.setenv("MPP_KERNELS", "triton")
    model = ViT(vit_config("S/16", depth=2, num_classes=10)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    @torch.compile(fullgraph=True)
    def step(images, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss

    images, labels = torch.randn(8, 3, 224, 224, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        loss = step(images, labels)
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    assert gate.decisions() == {"attention": "triton", "layer_norm": "triton", "add_layer_norm": "triton"}
