"""The one loss definition, for training and evaluation alike.

The loss of an iteration (or of an evaluation) is the sum of the per-token losses over every loss
token of the global batch divided by the number of those tokens, whatever the split into
micro-batches and data-parallel ranks. Each micro-batch therefore returns its *sum* and its token
count (megatron-core's 3-tuple, with `config.calculate_per_token_loss = True`): the schedule adds
them up instead of averaging micro-batch means, and `finalize_model_grads` divides the gradients
by the token total over all DP ranks. A mean of per-micro-batch means would weight a micro-batch
with 3 answer tokens like one with 300 ("SFT loss depends on DP size").
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

LOSS_KEY = "lm loss"


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """(sum of per-token losses where loss_mask is 1, number of such tokens as int tensor, report).

    The report holds [sum, count] (detached) so the caller can add up micro-batches and ranks.
    """
    mask = loss_mask.to(per_token_loss.device, torch.float32)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {LOSS_KEY: report}


def reduce_loss(reports: list, device) -> tuple[float, float]:
    """(sum of per-token losses, number of loss tokens) of this rank's micro-batch reports, summed
    over the data-parallel group. Only the last pipeline stage holds reports; its value is what
    gets logged. The loss is `per_token(*reduce_loss(...))`."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for report in reports:
        total += report[LOSS_KEY].to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0]), float(total[1])


def per_token(loss_sum: float, tokens: float) -> float:
    """The loss: NaN when there is no loss token at all."""
    return loss_sum / tokens if tokens > 0 else float("nan")
