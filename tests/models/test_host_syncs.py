"""No host syncs on the model's forward path when the micro-batch's sizes come from the collator.

On a GPU every Python value read from a device tensor (`.item()`, `.tolist()`, `int(t)`, `if t:`,
`torch.equal`, `.nonzero()`, a boolean-mask index whose result size depends on the mask, a
`repeat_interleave` sized by a tensor) stops the host until the device catches up; torch reports them
with `torch.cuda.set_sync_debug_mode`, which is CUDA-only. Here, on CPU, the same calls are counted
by call site (a TorchFunctionMode sees every torch call) while the model's forward runs (training
mode, labels given: the loss path too). The packed-row boundaries are an input kept on the host
(training keeps them there); reading them is not a sync and is not counted.
"""
from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.distributed

_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "masked_select", "cpu", "numpy",
          "equal"}


def _site() -> str:
    """The innermost megatron_patch or megatron-core frame of the caller."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        for root in ("megatron_patch/", "megatron/core/"):
            if root in name:
                return f"{root}{name.split(root, 1)[1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "elsewhere"


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class _SyncCounter(TorchFunctionMode):
    """Every torch function and Tensor method call passes here while the mode is on (nothing is patched)."""

    def __init__(self, exempt: tuple):
        super().__init__()
        self.seen, self.exempt = Counter(), {id(t) for t in exempt}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        reads = name in _READS and not (args and id(args[0]) in self.exempt)
        reads |= name in ("__getitem__", "__setitem__") and len(args) > 1 and _has_bool_index(args[1])
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        reads |= name == "repeat_interleave" and isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if reads:
            kind = "boolean-mask " if name in ("__getitem__", "__setitem__") else ""
            self.seen[f"{_site()} {kind}{name}"] += 1
        return func(*args, **kwargs)


def sync_sites(case: str) -> dict:
    """{call site: count} of sync-like calls during one training-mode forward of the tiny model (TP1 x PP1)."""
    from megatron_patch.models.idefics2.config import ParallelOptions
    from megatron_patch.models.idefics2.image_counts import ImageCounts
    from megatron_patch.platform import init_distributed
    from megatron_patch.testing.parity import random_inputs
    from tests.models.idefics2_cases import build_from_hf, pack_rows, tiny_hf_model

    init_distributed(1, 1, seed=1234)
    config, hf_model = tiny_hf_model("mistral", False)
    model = build_from_hf(config, hf_model, ParallelOptions()).train()
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=5)
    if case.startswith("packed"):
        inputs = pack_rows(inputs, [[0, 1]])
    if case == "text_only":
        text = inputs["input_ids"].masked_fill(inputs["input_ids"] == config.image_token_id, 5)
        inputs = {**inputs, "input_ids": text, "image_mask": torch.zeros_like(inputs["image_mask"])}
    ids = inputs["input_ids"]
    positions = inputs.get("position_ids", torch.arange(ids.shape[1]).expand_as(ids))
    counts = None
    if not case.endswith("measured"):  # the collator's counts, as training passes them
        counts = ImageCounts.measure(ids, inputs["image_mask"], inputs["pixel_attention_mask"], config.image_token_id,
                                     config.vision_config.patch_size)
    cu_seqlens = inputs.get("cu_seqlens")
    labels = torch.roll(ids, -1, dims=1)
    with _SyncCounter(exempt=(cu_seqlens,) if cu_seqlens is not None else ()) as counter:
        model(ids, positions, inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["image_mask"],
              labels=labels, cu_seqlens=cu_seqlens, image_counts=counts)
    return dict(counter.seen)


# megatron-core's vocab-parallel cross entropy (the last stage's per-token loss) zeroes the targets
# outside this rank's vocabulary slice with `x[mask] = 0`: a boolean-mask assignment, twice per
# micro-batch, whatever the depth. Not ours to change; everything before it reads nothing back.
MEGATRON_LOSS = {
    "megatron/core/tensor_parallel/cross_entropy.py:calculate_predicted_logits boolean-mask __setitem__": 2}


@pytest.mark.parametrize("case", ["images", "packed", "text_only"])
def test_no_host_sync_in_the_forward_with_the_collators_counts(case):
    sites = run_distributed(1, sync_sites, case)[0]
    assert {site: n for site, n in sites.items() if not site.startswith("megatron/core/")} == {}
    assert {site: n for site, n in sites.items() if site.startswith("megatron/core/")} == MEGATRON_LOSS


@pytest.mark.parametrize("case", ["images_measured", "packed_measured"])
def test_without_counts_the_forward_measures_them_once_not_per_layer(case):
    """A caller with tensors only (parity tools, HF-style use): the sizes are read back where they are
    measured, once per forward; no layer reads anything."""
    sites = {site: n for site, n in run_distributed(1, sync_sites, case)[0].items() if site not in MEGATRON_LOSS}
    assert sites and {site.split(":")[0] for site in sites} == {"megatron_patch/models/idefics2/image_counts.py"}
    assert sum(sites.values()) <= 8
