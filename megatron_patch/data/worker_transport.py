"""How a DataLoader worker's result reaches the main process: large arrays by shared memory.

What a worker returns is pickled to the main process by torch's ``ForkingPickler``: a torch
tensor's storage goes through shared memory (a segment plus a file descriptor fetched over a
socket, ~0.15 ms of main-process CPU each), anything else is pickled into bytes, written through
the pipe and unpickled (~2 ms per MB). Neither suits every leaf: images are MBs, tokens a few KB.
``to_wire`` (in the worker) therefore sends every array or tensor of at least ``SHM_MIN_BYTES``
as a tensor and every smaller one as a numpy array, and ``from_wire`` (in the main process) gives
back the original types, bit for bit (large numpy arrays become views of the shared segment).
``bench/bench_worker_transport.py`` measures both transports. Shared memory is tmpfs
(``/dev/shm``): with packing the buffered samples' pixels stay there, so a container needs a
``--shm-size`` of at least ``pack_buffer_size`` samples' uint8 pixels plus the batches in flight.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from megatron_patch.data.image_processing import PendingImage

# Measured with 2 workers on 2 cores, main-process CPU per array: a shared-memory segment costs
# ~0.15 ms whatever its size; pickling through the pipe ~0.01 ms at 2 KB, ~0.3 ms at 256 KB and
# ~2 ms at 1 MB. Items/s broke even between 256 and 512 KB. Smaller arrays go through the pipe.
SHM_MIN_BYTES = 256 << 10


class _SharedArray:
    """A numpy array travelling as a torch tensor (shared memory); ``from_wire`` makes it numpy again."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return _SharedArray, (self.tensor,)


class _PipedTensor:
    """A small torch tensor travelling as a numpy array (the pipe); ``from_wire`` makes it a tensor again."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return _PipedTensor, (self.array,)


def to_wire(obj):
    """A worker's return value with arrays >= ``SHM_MIN_BYTES`` as tensors, smaller tensors as numpy.

    Walks dicts, lists, tuples and ``PendingImage`` pixels; other leaves are kept. Arrays torch
    cannot hold (object dtype, negative strides) and tensors numpy cannot (bf16, autograd) stay as they are.
    """
    if isinstance(obj, np.ndarray):
        if obj.nbytes < SHM_MIN_BYTES:
            return obj
        try:
            with warnings.catch_warnings():  # PIL's arrays are read-only; the copy into shm is not
                warnings.simplefilter("ignore", UserWarning)
                return _SharedArray(torch.from_numpy(obj))
        except (TypeError, ValueError):
            return obj
    if isinstance(obj, torch.Tensor):
        if obj.nbytes >= SHM_MIN_BYTES or obj.requires_grad or obj.device.type != "cpu" \
                or obj.layout != torch.strided:
            return obj
        try:
            return _PipedTensor(obj.numpy())
        except (TypeError, RuntimeError):
            return obj
    if isinstance(obj, PendingImage):
        return PendingImage(to_wire(obj.pixels), obj.normaliser)
    # Exact container types only: subclasses (namedtuples, Counters) may not rebuild from items.
    if type(obj) is dict:
        return {k: to_wire(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(to_wire(v) for v in obj)
    return obj


def from_wire(obj):
    """The inverse of ``to_wire`` (in the main process): the original types and values."""
    if isinstance(obj, _SharedArray):
        return obj.tensor.numpy()
    if isinstance(obj, _PipedTensor):
        return torch.from_numpy(obj.array)
    if isinstance(obj, PendingImage):
        return PendingImage(from_wire(obj.pixels), obj.normaliser)
    if type(obj) is dict:
        return {k: from_wire(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(from_wire(v) for v in obj)
    return obj
