"""What every kernel file does the same way: register its launchers as custom ops, and launch them
on the input's own device. Private to this package; the kernel files import it, nothing else does.

The one registration idiom, for every op (attention, layer_norm, add_layer_norm):

    fwd = as_op("<name>_fwd", _launch_fwd, _fwd_fake)        # mpp_kernels::<name>_fwd
    bwd = as_op("<name>_bwd", _launch_bwd, _bwd_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)   # _backward calls bwd

The forward op carries its own derivative (no torch.autograd.Function around it): eager,
torch.compile(fullgraph=True) and opcheck all see one op whose backward is the other op. The
functional API around the forward op only reshapes (PyTorch differentiates the reshapes itself).
"""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import is_fake

from triton_kernels.gate import interpreting


def launch_device(t: torch.Tensor):
    """The context to launch the kernels for tensor `t` in: torch.cuda.device(t.device) for a real
    CUDA tensor, else a null context. Triton launches on the *current* device, so without it a
    tensor on cuda:1 (no torch.cuda.set_device(1)) would be handed to a kernel running on cuda:0.
    Fake and functional tensors (the triton_op bodies run as their own fake impl, and are traced by
    torch.compile / opcheck) get the null context: tracing must not call CUDA, and Inductor sets the
    device itself around the kernels it launches."""
    if t.device.type != "cuda" or is_fake(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def as_op(name: str, launcher, fake):
    """`launcher` as the custom op mpp_kernels::<name>. Compiled Triton: a triton_op, so
    torch.compile traces into the kernels (the launcher is its own fake impl: wrap_triton launches
    nothing on fake tensors). Under TRITON_INTERPRET=1 wrap_triton passes the InterpretedFunction
    through, which cannot run on fake tensors, so the launcher becomes an opaque custom_op with
    `fake` (same shapes, strides and dtypes) as its fake impl: torch.compile (e.g. backend=
    "aot_eager") and opcheck can still trace the ops on CPU. Called as a kernel file is imported,
    when Triton reads TRITON_INTERPRET too: the op's kind matches its kernels'."""
    if not interpreting():
        return torch.library.triton_op(f"mpp_kernels::{name}", launcher, mutates_args=())
    op = torch.library.custom_op(f"mpp_kernels::{name}", launcher, mutates_args=())
    op.register_fake(fake)
    return op


def wrap_triton(kernel):
    """torch.library.wrap_triton(kernel) for compiled Triton; under TRITON_INTERPRET=1 the kernel as it is
    (an InterpretedFunction, launched directly by the opaque custom op of `as_op`): torch 2.14 passes
    it through itself, torch 2.11 (the GPU machine's) refuses it ("wrap_triton only works on functions
    annotated with triton.jit")."""
    return kernel if interpreting() else torch.library.wrap_triton(kernel)
