"""Every (TP, PP, DP) layout of N GPUs, each rank's memory under it, and which layouts fit.

A layout is considered when TP x PP x DP = N and `validate_layout` (the check training runs first)
accepts it; its refusal is the one-line reason otherwise. A rank fits when

    weights + gradients + optimizer state + activations  <=  USABLE_FRACTION x GPU memory

with the optimizer (distributed or not) and recompute the flags ask for (`state_memory`,
`activations`); the rest of the GPU is left to the CUDA context, NCCL buffers and allocator
fragmentation. A layout fits when its largest rank does.

Fitting layouts are ranked by (1) larger DP first: less of the model per GPU to communicate per
layer and more samples per step; (2) at equal DP, smaller PP first (the 1F1B bubble costs
(PP-1)/(m+PP-1) of the step and stage 0 also carries the vision tower), i.e. TP inside a node before
PP; (3) lower peak memory (headroom for longer sequences or a larger micro-batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_patch.models.idefics2.config import ParallelOptions, validate_layout
from megatron_patch.planning.activations import ActivationEstimate, Workload, estimate
from megatron_patch.planning.census import RankParams, census
from megatron_patch.planning.state_memory import StateBytes, state_bytes

USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Settings:
    """What the planner was asked: the flags of `toolkits/plan_layout.py`."""

    gpus: int
    gpu_memory_gb: float = 80.0
    work: Workload = Workload(1, 4096)
    bf16: bool = False
    distributed_optimizer: bool = False
    recompute_granularity: str | None = None
    sequence_parallel: bool = False
    frozen: tuple = ()

    @property
    def usable_bytes(self) -> float:
        return USABLE_FRACTION * self.gpu_memory_gb * 2**30


@dataclass
class RankPlan:
    """One (stage, TP rank) part at one layout."""

    params: RankParams
    state: StateBytes
    """With the distributed optimizer when asked."""
    state_plain: StateBytes
    state_distributed: StateBytes
    activations: ActivationEstimate
    """Under the recompute setting asked for."""
    activations_none: ActivationEstimate
    activations_full: ActivationEstimate

    @property
    def peak(self) -> int:
        return self.state.total + self.activations.total


@dataclass
class LayoutPlan:
    tp: int
    pp: int
    dp: int
    refused: str | None = None
    ranks: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"

    @property
    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.peak)

    def fits(self, settings: Settings) -> bool:
        return self.refused is None and self.worst.peak <= settings.usable_bytes


def candidate_layouts(gpus: int) -> list[tuple[int, int, int]]:
    out = []
    for tp in range(1, gpus + 1):
        for pp in range(1, gpus // tp + 1):
            if gpus % (tp * pp) == 0:
                out.append((tp, pp, gpus // (tp * pp)))
    return out


def options(settings: Settings, tp: int, pp: int, recompute: str | None = "asked") -> ParallelOptions:
    granularity = settings.recompute_granularity if recompute == "asked" else recompute
    full = granularity == "full"
    return ParallelOptions(
        tp, pp, sequence_parallel=settings.sequence_parallel and tp > 1, recompute_granularity=granularity,
        recompute_method="uniform" if full else None, recompute_num_layers=1 if full else None,
        params_dtype=_dtype(settings.bf16),
    )


def _dtype(bf16: bool):
    import torch

    return torch.bfloat16 if bf16 else torch.float32


def plan_layout(hf_config, settings: Settings, tp: int, pp: int, dp: int) -> LayoutPlan:
    plan = LayoutPlan(tp, pp, dp)
    opts = options(settings, tp, pp)
    try:
        validate_layout(hf_config, opts, world_size=settings.gpus)
    except ValueError as err:
        plan.refused = str(err)
        return plan
    act_bytes = 2 if settings.bf16 else 4
    for (stage, _), params in sorted(census(hf_config, opts, settings.frozen).items()):
        acts = {g: estimate(hf_config, options(settings, tp, pp, g), stage, settings.work, act_bytes, settings.frozen)
                for g in (None, "full")}
        plain = state_bytes(params, dp, settings.bf16, distributed=False)
        dist = state_bytes(params, dp, settings.bf16, distributed=True)
        plan.ranks.append(RankPlan(
            params, dist if settings.distributed_optimizer else plain, plain, dist,
            estimate(hf_config, opts, stage, settings.work, act_bytes, settings.frozen), acts[None], acts["full"],
        ))
    return plan


def plan_all(hf_config, settings: Settings) -> list[LayoutPlan]:
    return [plan_layout(hf_config, settings, tp, pp, dp) for tp, pp, dp in candidate_layouts(settings.gpus)]


def ranked(plans: list[LayoutPlan], settings: Settings) -> list[LayoutPlan]:
    """The fitting layouts in the order of the module docstring."""
    fitting = [p for p in plans if p.fits(settings)]
    return sorted(fitting, key=lambda p: (-p.dp, p.pp, p.worst.peak))

