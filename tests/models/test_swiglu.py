"""The local layers' SwiGLU: same forward as megatron-core's unfused gated MLP, exact gradients."""
import pytest
import torch
import torch.nn.functional as F

from megatron_patch.models.idefics2.swiglu import swiglu

pytestmark = pytest.mark.distributed


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


def build_language_layers_and_log() -> tuple[list[str], str]:
    """(warnings logged while building the local language layers, the MLP class built) on one rank."""
    import logging

    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_patch.models.idefics2.layer_specs import language_block_spec
    from megatron_patch.platform import init_distributed

    init_distributed(1, 1, seed=0)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, gated_linear_unit=True,
                                   activation_func=F.silu, add_bias_linear=False)
        block = TransformerBlock(config, language_block_spec(config, use_te=False))
    finally:
        logging.getLogger().removeHandler(handler)
    return records, type(block.layers[0].mlp).__name__


def test_the_local_mlp_builds_without_megatron_cores_unknown_type_warning():
    from tests.distributed_harness import run_distributed

    records, mlp = run_distributed(1, build_language_layers_and_log)[0]
    assert mlp == "SwiGLUMLP"
    assert not [r for r in records if "Unknown MLP type" in r], records
