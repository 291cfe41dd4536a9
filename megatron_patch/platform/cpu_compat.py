"""CPU compatibility layer: the unmodified megatron-core code running on CPU with gloo.

megatron-core assumes CUDA. `apply()` is called once by `setup_platform()` and only when CUDA is
absent; on a GPU machine nothing here is touched. Verified with megatron-core 0.16.1 (Python 3.11)
and 0.17.1, 0.18.2, 0.19.2 (Python 3.12; CI runs 0.16 and the newest, `.ci/newest_megatron`):
`check_megatron_version()` refuses anything outside VERIFIED_RANGE, because every redirect below
names a place in megatron-core that an upgrade may move.

Redirects, each as narrow as found workable:

1. `torch` as seen by the megatron-core modules in `MEGATRON_MODULES` (and only there) is a proxy
   of the real torch module (`_TorchForCpu`) in which
   - `torch.cuda` is `_CpuCuda`: `current_device()` -> `torch.device("cpu")` (TP mappings, p2p,
     DDP buffers, layers allocate with `device=torch.cuda.current_device()`);
     `get_rng_state / set_rng_state / manual_seed / manual_seed_all / random.*` -> the CPU default
     generator (megatron's RNG tracker, `model_parallel_cuda_manual_seed`, rerun state machine);
     `synchronize / empty_cache / memory_*` -> no-ops (p2p, DDP, timers);
     `Stream / Event / stream / current_stream / default_stream` -> inert stand-ins (DDP
     communication stream, bucket overlap); `nvtx` -> no-op. Anything else is the real
     `torch.cuda` (so `torch.cuda.FloatTensor`, `OutOfMemoryError`, ... keep working).
   - `tensor / zeros / ones / empty / full / randn / empty_like` with a CUDA `device=` argument
     allocate on CPU (grad scaler, optimizer `found_inf`, grad clipping norms, schedules' token
     counters, rerun state machine all write `device='cuda'` literally).
   Torch itself, our code and other libraries keep the real torch: nothing global changes, and
   the proxy caches each attribute on first use, so the hot path pays one dict lookup as before.
2. `megatron.core.tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state` -> CPU
   generator state (they use `torch.cuda.default_generators` and `_lazy_call` directly).
3. `torch.Tensor.cuda` -> returns the tensor itself (tied embeddings at PP>1 do
   `weight.data.cuda()`; optimizer/grad-scaler state reload; `broadcast_data`). On a torch
   without CUDA the original always raises, so no working call changes meaning.
4. `torch.Tensor.type()` reports `torch.cuda.*Tensor` names for CPU tensors, but only while
   `DistributedOptimizer.__init__`, `Float16OptimizerWithFloat16Params.__init__` or
   `clip_grad_by_total_norm_fp32` run: they dispatch on / assert those strings.
5. A logging filter drops megatron's "CPU RNG state changed within GPU RNG context" warning: on
   CPU the tracked "CUDA" generator is the CPU one, so every dropout inside a fork would print it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types

import torch

VERIFIED_RANGE = ">=0.16.1,<0.20"

# megatron-core modules whose global name `torch` is replaced by the proxy (redirect 1).
MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.utils",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.mlp",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
)

RNG_MODULE = "megatron.core.tensor_parallel.random"
# (module, attribute) replaced (redirect 2) or wrapped (redirect 4); the clip function is looked
# up through both modules, so both bindings are wrapped.
RNG_FUNCTIONS = ((RNG_MODULE, "_get_cuda_rng_state"), (RNG_MODULE, "_set_cuda_rng_state"))
TYPE_NAME_FUNCTIONS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
)
PATCHED_ATTRIBUTES = RNG_FUNCTIONS + TYPE_NAME_FUNCTIONS
# (module, class, method) wrapped by redirect 4.
PATCHED_METHODS = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
)
RNG_WARNING = "CPU RNG state changed within GPU RNG context"
RNG_LOGGER = RNG_MODULE  # megatron logs it with logging.getLogger(__name__)

_applied = False
_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is outside the range this layer was checked against."""


def check_megatron_version(version: str | None = None) -> None:
    """Raise unless `version` (default: the installed one) is in VERIFIED_RANGE."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        from megatron.core import package_info

        version = package_info.__version__
    if Version(version) not in SpecifierSet(VERIFIED_RANGE):
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is installed but the CPU compatibility layer "
            f"(megatron_patch/platform/cpu_compat.py) was verified with megatron-core{VERIFIED_RANGE}; "
            "re-check its redirects against that version before using it"
        )


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # a bare ordinal means a GPU


def _on_cpu(factory):
    """Wrap a torch factory so a CUDA `device=` argument allocates on CPU instead."""

    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class _Inert:
    """Stand-in for torch.cuda.Stream / Event: CPU work is already ordered, so all no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: True if name == "query" else None

    def elapsed_time(self, other) -> float:
        return 0.0


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs) -> int:
    return 0


def _manual_seed(seed) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_cuda() -> types.ModuleType:
    """What megatron-core sees as `torch.cuda` on CPU; unknown names fall back to torch.cuda."""
    cuda = types.ModuleType("torch.cuda", "CPU stand-in for torch.cuda (megatron_patch cpu_compat)")
    rng = types.SimpleNamespace(
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda new_state, device="cuda": torch.set_rng_state(new_state),
        manual_seed=_manual_seed,
        manual_seed_all=_manual_seed,
    )
    vars(cuda).update(
        vars(rng),
        random=rng,
        current_device=lambda: torch.device("cpu"),
        synchronize=_noop,
        empty_cache=_noop,
        memory_allocated=_zero,
        max_memory_allocated=_zero,
        memory_reserved=_zero,
        max_memory_reserved=_zero,
        reset_peak_memory_stats=_noop,
        Stream=_Inert,
        Event=_Inert,
        stream=_nullcontext,
        current_stream=lambda device=None: _Inert(),
        default_stream=lambda device=None: _Inert(),
        nvtx=types.SimpleNamespace(range_push=_noop, range_pop=_noop, range=_nullcontext),
        __getattr__=lambda name: getattr(torch.cuda, name),  # PEP 562 fallback
    )
    return cuda


def _nullcontext(*args, **kwargs):
    return contextlib.nullcontext()


def _torch_for_cpu() -> types.ModuleType:
    """The torch module as megatron-core sees it on CPU (redirect 1).

    A plain module whose PEP 562 `__getattr__` fetches any other name from torch once and caches
    it, so later lookups cost what a lookup in torch itself costs (a subclass would cost ~3x).
    """
    proxy = types.ModuleType("torch", "torch as seen by megatron-core on CPU (megatron_patch cpu_compat)")

    def fallback(name: str):
        value = getattr(torch, name)
        setattr(proxy, name, value)
        return value

    proxy.__getattr__ = fallback
    proxy.cuda = _cpu_cuda()
    for name in ("tensor", "zeros", "ones", "empty", "full", "randn", "empty_like"):
        setattr(proxy, name, _on_cpu(getattr(torch, name)))
    return proxy


@contextlib.contextmanager
def _cuda_type_names():
    """Let Tensor.type() name CPU tensors as CUDA ones for the duration (redirect 4).

    Swapping a class attribute is not thread-safe; megatron calls these functions from the
    training thread only.
    """
    original = torch.Tensor.type
    own = torch.Tensor.__dict__.get("type")  # None: inherited from TensorBase

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        name = original(self, dtype, non_blocking, **kwargs)
        if dtype is None and isinstance(name, str) and name.startswith("torch.") and not self.is_cuda:
            return "torch.cuda." + name[len("torch."):]
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        if own is None:
            del torch.Tensor.type  # uncovers TensorBase.type again
        else:
            torch.Tensor.type = own


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.Tensor.type is not _ORIGINAL_TENSOR_TYPE:  # already inside a wrapped call
            return fn(*args, **kwargs)
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RNG_WARNING not in record.getMessage()


def _tensor_cuda(self, *args, **kwargs):
    return self


def apply() -> None:
    """Install every redirect once. Call only when CUDA is unavailable."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU compatibility layer must not be applied when CUDA is available")
    check_megatron_version()

    proxy = _torch_for_cpu()
    for name in MEGATRON_MODULES:
        importlib.import_module(name).torch = proxy

    random = importlib.import_module(RNG_MODULE)
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    torch.Tensor.cuda = _tensor_cuda

    for module_name, attr in TYPE_NAME_FUNCTIONS:
        module = importlib.import_module(module_name)
        setattr(module, attr, _with_cuda_type_names(getattr(module, attr)))
    for module_name, cls_name, method in PATCHED_METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        setattr(cls, method, _with_cuda_type_names(getattr(cls, method)))

    logging.getLogger(RNG_LOGGER).addFilter(_DropRngWarning())
    _applied = True


def is_applied() -> bool:
    return _applied
