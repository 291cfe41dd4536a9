"""The local layers' SwiGLU: same forward as megatron-core's unfused gated MLP, exact gradients."""
import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.swiglu import swiglu


def _reference(x):
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def test_swiglu_gradients_are_exact_in_float64():
    x = torch.randn(3, 2, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x,))


def test_swiglu_matches_autograd_of_the_unfused_form_in_float32():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2, 96, generator=g) * 4).requires_grad_()  # large |x|: silu's tails
    grad = torch.randn(64, 2, 48, generator=g)
    ours = swiglu(x)
    (d_ours,) = torch.autograd.grad(ours, x, grad)
    ref_x = x.detach().clone().requires_grad_()
    ref = _reference(ref_x)
    (d_ref,) = torch.autograd.grad(ref, ref_x, grad)
    assert torch.equal(ours, ref)  # the same forward arithmetic
    assert torch.equal(d_ours, d_ref)  # and the same backward kernels (autograd's silu_backward)


def test_swiglu_keeps_only_its_input_for_backward():
    x = torch.randn(8, 2, 16, requires_grad=True)
    y = swiglu(x * 1.0)
    saved = [t for t in y.grad_fn.saved_tensors]
    assert len(saved) == 1 and saved[0].shape == x.shape
