"""Platform layer: device and backend choice (CUDA/NCCL or CPU/gloo), distributed start-up,
seeding, optional-accelerator detection and the CPU compatibility layer for megatron-core.

    from megatron_patch.platform import init_distributed
    init_distributed(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, seed=1234)
"""
from .accelerators import accelerators
from .distributed import destroy_distributed_state, get_device, init_distributed, setup_platform
from .seeding import set_seed

__all__ = [
    "accelerators",
    "destroy_distributed_state",
    "get_device",
    "init_distributed",
    "set_seed",
    "setup_platform",
]
