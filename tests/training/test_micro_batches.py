"""Each micro-batch is finished when the schedule takes it (training/micro_batches.py): the first stage
holds the pixels of one micro-batch at a time, in the model's dtype; what crosses a hop arrives
exactly as the collator made it (host values on the host, tensors on the device)."""
from __future__ import annotations

import weakref

import pytest
import torch

from tests.distributed_harness import run_distributed
from tests.training.fixtures import train_flags, training_inputs

pytestmark = pytest.mark.distributed


def _pixels_held_at_each_forward(flags: list) -> list:
    """Train (and evaluate) with `flags`; at every forward of the first stage: (finished pixel tensors
    alive, whether the forward's own is one of them, whether it is in the model's dtype)."""
    from megatron.core import parallel_state

    from megatron_patch.training import micro_batches
    from megatron_patch.training.arguments import parse_args
    from megatron_patch.training.build import build_training
    from megatron_patch.training.loop import pretrain

    ctx = build_training(parse_args(flags))
    finished, seen, original = [], [], micro_batches.model_inputs

    def finishing(part, dtype, patch_size):
        micro = original(part, dtype, patch_size)
        if "pixel_values" in micro.inputs:
            finished.append(weakref.ref(micro.inputs["pixel_values"]))
        return micro

    def before_forward(module, args, kwargs):
        alive = [ref() for ref in finished if ref() is not None]
        pixels = kwargs["pixel_values"]
        seen.append((len(alive), any(t is pixels for t in alive), pixels.dtype == ctx.model.config.params_dtype))

    micro_batches.model_inputs = finishing
    hook = None
    if parallel_state.is_pipeline_first_stage():
        hook = ctx.model.module.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        pretrain(ctx)
    finally:
        micro_batches.model_inputs = original
        if hook is not None:
            hook.remove()
    return seen


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_the_first_stage_holds_one_micro_batch_of_pixels_at_a_time(tmp_path, tp, pp):
    inputs = training_inputs()
    flags = train_flags(inputs, tmp_path / "run", tp=tp, pp=pp, iters=2, mbs=1, gbs=4,
                        extra=["--valid-data-path", str(inputs["valid"]), "--eval-interval", "2", "--eval-iters", "1"])
    seen = run_distributed(2, _pixels_held_at_each_forward, flags)
    first_stage = [s for s in seen if s]
    assert len(first_stage) == (2 if tp == 2 else 1)
    for forwards in first_stage:
        assert len(forwards) == 12  # 2 iterations and an evaluation (--eval-iters 1), 4 micro-batches each
        assert forwards == [(1, True, True)] * len(forwards)  # before: all 4 of an iteration, from its start


def _hop_round_trip(packed_segments: int) -> dict | None:
    """A collated micro-batch (raw pixels, packed rows of `packed_segments` segments) from TP rank 0 to TP
    rank 1 by `tensor_hop`; on rank 1, each key: whether it arrived equal, and on which side."""
    import torch.distributed as dist

    from megatron_patch.data.collate import collate
    from megatron_patch.data.image_processing import Idefics2ImageTransform
    from megatron_patch.data.packing import pack
    from megatron_patch.platform import get_device, init_distributed
    from megatron_patch.training.batch_transport import tensor_hop

    init_distributed(2, 1, seed=1)
    transform = Idefics2ImageTransform()
    from PIL import Image

    images = [Image.new("RGB", (30 + 7 * i, 20 + 5 * i), (40 * i, 90, 200)) for i in range(3)]
    lengths = [1] * (packed_segments - 2) + [2, 3]
    samples = [{"id": str(i), "tokens": torch.full((n,), 7 if i % 5 else 9), "labels": torch.full((n,), 3),
                "loss_mask": torch.ones(n), "position_ids": torch.arange(n),
                "pixel_values": transform([images[i % 3]]) if i < 3 else []} for i, n in enumerate(lengths)]
    seq = sum(lengths) + 5
    batch = collate([pack(samples), pack(samples[:2])], seq, pad_token_id=0, raw_pixels=True, image_token_id=9)
    mine = tensor_hop(batch if dist.get_rank() == 0 else None, get_device())
    if dist.get_rank() == 0:
        return None
    out = {}
    for key, value in mine.items():
        sent = batch[key]
        same = torch.equal(value.cpu(), sent) and value.dtype == sent.dtype if torch.is_tensor(sent) else value == sent
        out[key] = (bool(same), "host" if not torch.is_tensor(value) or value.device.type == "cpu" else "device")
    return out


@pytest.mark.parametrize("segments", [12, 5000], ids=["in-header", "overflow"])
def test_a_hop_delivers_every_key_exactly_host_values_on_the_host(segments):
    """The 5,000 boundaries do not fit the header: they travel as a tensor (one more sync), same values."""
    got = run_distributed(2, _hop_round_trip, segments)[1]
    assert set(got) == {"tokens", "position_ids", "labels", "loss_mask", "pixel_values", "pixel_attention_mask",
                        "image_mask", "cu_seqlens", "pixel_norm", "num_images", "image_tokens", "image_sizes"}
    assert all(same for same, _ in got.values()), got
    host = {"cu_seqlens", "pixel_norm", "num_images", "image_tokens", "image_sizes"}
    assert {key for key, (_, side) in got.items() if side == "host"} >= host
