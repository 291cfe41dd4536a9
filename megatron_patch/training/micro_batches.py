"""Each micro-batch finished in one place: loader -> transport -> the model's inputs, one at a time
inside megatron-core's schedule.

    stream = micro_batches(ctx, loader_iterator)        # every rank (the loader on the loading ranks)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=stream, ...)  # step.py
    stream.text_tokens, stream.shapes                   # what this rank loaded, for the metrics

The schedule's forward step takes `next(stream)` once per micro-batch. Each call, on every rank:
1. the loading rank (TP rank 0 of the first stage, `batch_transport.loads_data`) takes the next
   collated micro-batch (`data/collate.py`, pixels as uint8 levels) from the loader and counts its
   tokens and shapes;
2. `batch_transport.tensor_hop` gives each rank of the stage its part: tensors on the device, the
   collator's host values (image counts, packed-row boundaries, pixel normalisation) on the host;
3. `model_inputs` finishes it: pixels normalised (`data.image_processing.normalise_pixels`) and cast
   straight to the model's dtype, the image counts as the model's `ImageCounts`.
So the first stage holds the device pixels of the micro-batch it runs (and those autograd keeps
for the backward of micro-batches still in flight under 1F1B), never an iteration's.

With PP > 1 the later stages' part (labels, loss mask, boundaries) crosses the pipeline group before
the schedule (`batch_transport.pipeline_hop`; inside the schedule the stages are at different
micro-batches), so there the loading rank reads the iteration's micro-batches up front: they wait on
the host, pixels still uint8.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_num_microbatches

from megatron_patch.data.image_processing import normalise_pixels
from megatron_patch.models.idefics2.image_counts import ImageCounts
from megatron_patch.training.batch_transport import pipeline_hop, tensor_hop
from megatron_patch.training.flops import BatchShapes


@dataclass
class MicroBatch:
    """One micro-batch on this rank, ready for the model."""

    inputs: dict  # keyword arguments of Idefics2Model.forward
    loss_mask: Optional[torch.Tensor]  # [b, s] float32 on the last stage, else None


def model_inputs(part: dict, dtype: torch.dtype, patch_size: int) -> MicroBatch:
    """This rank's part of a micro-batch (`tensor_hop`'s) -> the model's inputs: the only place where a
    micro-batch changes on its way from the collator to the model (raw pixels become `dtype` values)."""
    inputs = {"input_ids": part.get("tokens"), "position_ids": part.get("position_ids"),
              "labels": part.get("labels"), "cu_seqlens": part.get("cu_seqlens")}
    if "pixel_values" in part:  # the first stage
        inputs["pixel_values"] = normalise_pixels(part["pixel_values"], part["pixel_attention_mask"],
                                                  part.get("pixel_norm"), dtype)
        inputs["pixel_attention_mask"], inputs["image_mask"] = part["pixel_attention_mask"], part["image_mask"]
        if "image_tokens" in part:  # the collator's counts (else the model measures them)
            inputs["image_counts"] = ImageCounts.from_sizes(part["num_images"].tolist(), part["image_tokens"],
                                                            part["image_sizes"], patch_size)
    return MicroBatch(inputs, part.get("loss_mask"))


class MicroBatchStream:
    """The data iterator of one schedule run: `count` micro-batches, each finished when taken."""

    def __init__(self, ctx, loader_iterator, count: int):
        self.count, self.device = count, ctx.device
        self.dtype = ctx.model.config.params_dtype
        self.patch_size = ctx.hf_config.vision_config.patch_size
        self.text_tokens = 0  # non-pad tokens this rank loaded (0 on ranks that load nothing)
        self.shapes = BatchShapes(0, ctx.settings.schedule.seq_length)  # of what this rank loaded (FLOP count)
        self._loader, self._taken, self._ahead = loader_iterator, 0, None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1 and \
                parallel_state.get_tensor_model_parallel_rank() == 0:
            self._ahead = deque(pipeline_hop(self._read(), self.device) for _ in range(count))

    def _read(self) -> Optional[dict]:
        if self._loader is None:
            return None
        batch = next(self._loader)
        self.text_tokens += int(batch["attention_mask"].sum())
        self.shapes = self.shapes + BatchShapes.from_batch(batch, self.patch_size)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        if self._taken == self.count:
            raise StopIteration
        self._taken += 1
        batch = self._ahead.popleft() if self._ahead is not None else self._read()
        return model_inputs(tensor_hop(batch, self.device), self.dtype, self.patch_size)


def micro_batches(ctx, loader_iterator, count: Optional[int] = None) -> MicroBatchStream:
    """The next `count` (default: an iteration's) micro-batches of this rank, for one schedule run;
    `loader_iterator` on the loading ranks, None elsewhere."""
    return MicroBatchStream(ctx, loader_iterator, get_num_microbatches() if count is None else count)
