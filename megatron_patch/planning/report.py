"""Text of the planner's answer: per-rank tables of each accepted layout, the fitting layouts ranked,
and one line per layout that does not fit or is refused. GB here means GiB (2**30 bytes)."""
from __future__ import annotations

from megatron_patch.planning.layouts import LayoutPlan, Settings, ranked

GB = 2**30


def _gb(n: float) -> str:
    return f"{n / GB:.1f}"


def _b(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e7 else f"{n:,}"


def rank_rows(plan: LayoutPlan) -> list[str]:
    """One row per group of TP ranks of a stage whose figures are equal (DP replicas are identical)."""
    head = (f"  {'stage':>5} {'TP ranks':>8} | {'vision':>8} {'connector':>9} {'language':>9} {'counted':>9} | "
            f"{'weights':>7} {'grads':>6} {'optim':>6} {'optim':>6} | {'act':>6} {'act':>6} | {'total':>6}")
    sub = (f"  {'':>5} {'':>8} | {'params held (counted once)':^38} | "
           f"{'GB':>7} {'GB':>6} {'plain':>6} {'dist':>6} | {'none':>6} {'full':>6} | {'GB':>6}")
    rows = [head, sub]
    groups: list[list] = []
    for r in plan.ranks:
        p = r.params
        key = (p.stage, tuple(p.held.values()), r.state.total, r.activations.total)
        if groups and groups[-1][0] == key:
            groups[-1][1].append(r)
        else:
            groups.append([key, [r]])
    for _, members in groups:
        r, p = members[0], members[0].params
        ranks = f"{p.tp_rank}" if len(members) == 1 else f"{p.tp_rank}-{members[-1].params.tp_rank}"
        counted = sum(sum(m.params.owned.values()) for m in members) // len(members)
        rows.append(
            f"  {p.stage:>5} {ranks:>8} | {_b(p.held['vision']):>8} {_b(p.held['connector']):>9} "
            f"{_b(p.held['llm']):>9} {_b(counted):>9} | {_gb(r.state.weights):>7} {_gb(r.state.grads):>6} "
            f"{_gb(r.state_plain.optimizer):>6} {_gb(r.state_distributed.optimizer):>6} | "
            f"{_gb(r.activations_none.total):>6} {_gb(r.activations_full.total):>6} | {_gb(r.peak):>6}"
        )
    return rows


def why_not(plan: LayoutPlan, settings: Settings) -> str:
    if plan.refused:
        return f"{plan.name}: refused by validate_layout: {plan.refused}"
    w = plan.worst
    return (f"{plan.name}: stage {w.params.stage} TP rank {w.params.tp_rank} needs {_gb(w.peak)} GB (weights "
            f"{_gb(w.state.weights)} + grads {_gb(w.state.grads)} + optimizer {_gb(w.state.optimizer)} + activations "
            f"{_gb(w.activations.total)}) > {_gb(settings.usable_bytes)} GB usable")


def settings_line(settings: Settings) -> str:
    w = settings.work
    image = f"{w.image_size} px" if w.image_size else "full-size"
    return (f"{settings.gpus} GPUs x {settings.gpu_memory_gb:g} GB ({_gb(settings.usable_bytes)} GB usable), "
            f"{'bf16' if settings.bf16 else 'fp32'}, micro-batch {w.micro_batch_size} x {w.seq_length} tokens, "
            f"{w.images_per_sample} {image} image(s) per sample, "
            f"{'distributed' if settings.distributed_optimizer else 'plain'} optimizer, recompute "
            f"{settings.recompute_granularity or 'none'}{', sequence parallel' if settings.sequence_parallel else ''}"
            f"{', frozen: ' + ', '.join(sorted(settings.frozen)) if settings.frozen else ''}")


def render(plans: list[LayoutPlan], settings: Settings, hf_params: int, details: bool = True) -> str:
    lines = [f"model: {hf_params:,} parameters (HF count)", settings_line(settings), ""]
    if details:
        for plan in plans:
            if plan.refused is None:
                lines += [f"{plan.name}  (per rank; DP replicas identical; 'total' = the flags' optimizer and recompute)"]
                lines += rank_rows(plan) + [""]
    good = ranked(plans, settings)
    lines.append("layouts that fit, best first (larger DP, then smaller PP, then lower peak):")
    for i, plan in enumerate(good, 1):
        w = plan.worst
        lines.append(f"  {i}. {plan.name}: peak {_gb(w.peak)} GB on stage {w.params.stage} "
                     f"(state {_gb(w.state.total)} + activations {_gb(w.activations.total)})")
    if not good:
        lines.append("  none")
    lines += ["", "layouts that do not fit:"]
    lines += [f"  {why_not(p, settings)}" for p in plans if not p.fits(settings)] or ["  none"]
    return "\n".join(lines)
