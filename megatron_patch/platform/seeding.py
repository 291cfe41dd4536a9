"""The one seeding function of the project (python, numpy, torch and megatron's RNG tracker)."""
from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and megatron-core's RNG tracker with `seed`.

    `model_parallel_cuda_manual_seed` seeds the default generator (on CPU: redirected to the CPU
    one) with `seed` and registers the tensor-parallel stream `seed + 2718 + tp_rank`, used for
    TP weight init and dropout in TP regions. Without model-parallel state it seeds as rank 0.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from .distributed import setup_platform

    setup_platform()  # the tracker needs the CPU redirects when CUDA is absent
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if parallel_state.model_parallel_is_initialized():
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed, tp_rank=0, ep_rank=0, etp_rank=0)
