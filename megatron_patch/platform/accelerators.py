"""Optional accelerators (transformer-engine, flash-attn, apex and its fused weight-gradient
extension `fused_weight_gradient_mlp_cuda`): detected once, reported once.

Every code path has a torch fallback, so a missing or broken accelerator only costs speed.
"""
from __future__ import annotations

import functools
import importlib

OPTIONAL = ("transformer_engine", "flash_attn", "apex", "fused_weight_gradient_mlp_cuda")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except BaseException:  # a broken install may raise anything (OSError, RuntimeError, SystemExit...)
        return False
    return True


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[tuple[str, bool], ...]:
    return tuple((name, _importable(name)) for name in OPTIONAL)


def accelerators() -> dict[str, bool]:
    """{name: importable} for each optional accelerator; detected on first call, then cached."""
    return dict(_detect())


def describe() -> str:
    """One-line summary, e.g. 'transformer_engine=no flash_attn=no apex=no'."""
    return " ".join(f"{name}={'yes' if ok else 'no'}" for name, ok in accelerators().items())
