"""Platform layer: API, CPU compatibility guard, and megatron-core GPT training on gloo ranks.

The key proof: an unmodified megatron-core GPTModel trains at TP=2 x PP=2 on 4 CPU ranks with
megatron's DDP, DistributedOptimizer (+ clipping) and 1F1B schedule, and its losses match the same
model at TP=1 x PP=1. Both layouts start from one full set of weights, generated per global
parameter name and sliced to each rank's shard, so the comparison does not depend on megatron's
layout-dependent initialisation order.
"""
from __future__ import annotations

import importlib
import zlib

import pytest

from tests.distributed_harness import free_port, run_distributed

pytestmark = pytest.mark.distributed


VOCAB, SEQ, MICRO_BATCH, MICROBATCHES, STEPS = 64, 16, 2, 4, 4


# ---------------------------------------------------------------- CPU compatibility layer guard
def test_version_guard_refuses_unverified_megatron_versions():
    from megatron_patch.platform import cpu_compat

    for version in ("0.16.1", "0.16.5", "0.19.2"):
        cpu_compat.check_megatron_version(version)
    for version in ("0.16.0", "0.20.0", "1.0.0", "0.15.3"):
        with pytest.raises(cpu_compat.UnsupportedMegatronVersion, match=r"verified with megatron-core>=0\.16\.1"):
            cpu_compat.check_megatron_version(version)


def test_installed_megatron_is_the_verified_one():
    from megatron_patch.platform import cpu_compat

    cpu_compat.check_megatron_version()  # fails loudly after a megatron-core upgrade


def test_every_patch_point_still_exists():
    from megatron_patch.platform import cpu_compat

    for name in cpu_compat.MEGATRON_MODULES:
        module = importlib.import_module(name)
        assert hasattr(module, "torch"), f"{name} no longer uses the global name `torch`"
    for name, attr in cpu_compat.PATCHED_ATTRIBUTES:
        assert callable(getattr(importlib.import_module(name), attr, None)), f"{name}.{attr} is gone"
    for name, cls, method in cpu_compat.PATCHED_METHODS:
        assert callable(getattr(getattr(importlib.import_module(name), cls), method)), f"{name}.{cls}.{method}"
    random = importlib.import_module(cpu_compat.RNG_MODULE)
    assert cpu_compat.RNG_WARNING in open(random.__file__).read(), "megatron's RNG warning text changed"
    # destroy_distributed_state() frees the groups megatron lists here (else each layout leaks them)
    parallel_state = importlib.import_module("megatron.core.parallel_state")
    assert hasattr(parallel_state, "_global_process_group_list")


def test_accelerator_probe_survives_a_broken_install(monkeypatch):
    import sys

    probe = importlib.import_module("megatron_patch.platform.accelerators")  # the module, not the function

    class Broken:  # an installed package whose import blows up with something odd
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "broken_accelerator":
                raise OSError("libcudart.so: cannot open shared object file")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    assert probe._importable("broken_accelerator") is False
    assert probe._importable("json") is True


_EXIT_CHECK = """
import atexit, os, sys
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from megatron.core import parallel_state
from megatron_patch.platform import init_distributed
from megatron_patch.platform.distributed import mark_error_exit

def after_ours():  # atexit runs handlers last-in first-out: this one runs after the platform's
    print(f"after exit: distributed={dist.is_initialized()} model_parallel={parallel_state.model_parallel_is_initialized()}", flush=True)

for name in ("destroy_process_group", "_abort_process_group"):  # which shutdown the exit takes
    def spy(*args, _name=name, _real=getattr(distributed_c10d, name), **kwargs):
        if not args and not kwargs:
            print(f"shutdown by {_name}", flush=True)
        return _real(*args, **kwargs)
    setattr(distributed_c10d, name, spy)
    setattr(dist, name, spy)

def timeout(group):
    return group._get_backend(torch.device("cpu")).options._timeout

atexit.register(after_ours)
init_distributed(2, 1, seed=1, timeout_minutes=3)
print("gloo copies:", parallel_state._DATA_PARALLEL_GROUP_GLOO, parallel_state._DATA_PARALLEL_GROUP_WITH_CP_GLOO)
print("timeouts:", timeout(dist.group.WORLD), timeout(parallel_state.get_tensor_model_parallel_group()), flush=True)
if dist.get_rank() == 1:
    mark_error_exit()  # what the entry point does before its one-line error
    sys.exit(1)  # one rank leaves with an error, its peer finishes normally
if len(sys.argv) > 1:
    raise RuntimeError("an uncaught error")  # noticed at exit without mark_error_exit
"""


def test_process_groups_are_shut_down_before_the_interpreter_finalises(tmp_path):
    """Left to finalisation, gloo's and the store's threads can abort a process that already exited."""
    import os
    import subprocess
    import sys

    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen([sys.executable, "-c", _EXIT_CHECK], stdout=subprocess.PIPE, text=True,
                              env={**base, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_PORT": str(port)})
             for r in (0, 1)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 1], outputs
    for out in outputs:
        assert "after exit: distributed=False model_parallel=False" in out, out
        assert "gloo copies: None None" in out  # megatron-core made no gloo twins of its DP groups
        assert "timeouts: 0:03:00 0:03:00" in out  # the world's and megatron's groups
    # A clean exit destroys the groups; an error exit aborts them: NCCL's graceful destroy waits for
    # collectives that failed or hung peers will never finish.
    assert [out.count("shutdown by") for out in outputs] == [1, 1], outputs
    assert "shutdown by destroy_process_group" in outputs[0] and "shutdown by _abort_process_group" in outputs[1]


def test_an_uncaught_exception_aborts_the_process_groups(monkeypatch):
    """The interpreter sets sys.last_value for an uncaught exception before atexit runs (seen in a
    subprocess while writing this test); here the shutdown reads it, in-process."""
    import sys

    from megatron.core import parallel_state
    from megatron_patch.platform import distributed

    calls = []
    monkeypatch.setattr(parallel_state, "destroy_model_parallel", lambda: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"))
    monkeypatch.setattr(distributed, "_error_exit", False)
    monkeypatch.delattr(sys, "last_value", raising=False)
    distributed._shut_down_at_exit()
    monkeypatch.setattr(sys, "last_value", RuntimeError("uncaught"), raising=False)
    distributed._shut_down_at_exit()
    assert calls == ["destroy", "abort"]


def test_api_on_one_rank():
    (report,) = run_distributed(1, _api_job)
    assert report["device"] == "cpu" and report["cpu_compat_applied"]
    assert report["silent_second_setup"]
    assert report["tracker_reproducible"] and report["default_stream_untouched"] and not report["rng_warnings"]
    error = report["layout_error"]
    assert "\n" not in error and "--tensor-model-parallel-size 2" in error
    assert "--pipeline-model-parallel-size 1" in error and "world size 1" in error
    assert report["tp_size_after_error"] == 1  # a refused layout leaves the previous one in place


def _api_job():
    import contextlib
    import io
    import logging

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_patch.platform import cpu_compat, get_device, init_distributed, set_seed, setup_platform

    init_distributed(1, 1, seed=7)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        setup_platform()  # already reported at the first call in this process
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(cpu_compat.RNG_LOGGER).addHandler(handler)
    draws, untouched = [], True
    for _ in range(2):
        set_seed(7)
        before = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():  # megatron's model-parallel stream, on the CPU generator
            draws.append(torch.rand(3))
        untouched &= torch.equal(before, torch.get_rng_state())
    try:
        init_distributed(2, 1)
        error = ""
    except ValueError as exc:
        error = str(exc)
    return {
        "device": get_device().type,
        "cpu_compat_applied": cpu_compat.is_applied(),
        "silent_second_setup": printed.getvalue() == "",
        "tracker_reproducible": torch.equal(*draws),
        "default_stream_untouched": untouched,
        "rng_warnings": [r.getMessage() for r in records],
        "layout_error": error,
        "tp_size_after_error": ps.get_tensor_model_parallel_world_size(),
    }


# ------------------------------------------------------------------- GPT training on gloo ranks
def _full_value(name: str, shape, seed: int):
    """Deterministic full (unsharded) value of global parameter `name`."""
    import torch

    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    if "layernorm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def _load_layout_independent_weights(model, seed: int) -> None:
    """Give each local shard the slice of the same full tensors whatever the TP x PP layout."""
    import torch
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    layer_of = {f"decoder.layers.{i}.": f"decoder.layers.{layer.layer_number - 1}." for i, layer in
                enumerate(model.decoder.layers)} if hasattr(model, "decoder") else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            full_name = name
            for local, global_ in layer_of.items():
                if name.startswith(local):
                    full_name = global_ + name[len(local):]
            if full_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                full_name = "embedding.word_embeddings.weight"  # the tied copy on the last stage
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            full = _full_value(full_name, shape, seed)
            if getattr(param, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=param.partition_dim)[tp_rank]
            param.copy_(full)


def _train_tiny_gpt(tp: int, pp: int, steps: int, seed: int = 1234):
    """Train a tiny GPT a few steps on this rank's share of one fixed batch.

    Returns (pp_rank, tp_rank, per-step losses on the last stage else None, per-step grad norms).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_patch.platform import init_distributed

    init_distributed(tp, pp, seed=seed)
    config = TransformerConfig(
        num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )
    model = GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True, position_embedding_type="rope",
    )
    _load_layout_independent_weights(model, seed)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=False)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(  # clip_grad below the grad norms seen, so clipping really scales
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, clip_grad=0.5, use_distributed_optimizer=True),
        [model], use_gloo_process_groups=False,  # init_distributed creates no gloo copies of megatron's groups
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads  # DP grad reduce + tied-embedding sync

    gen = torch.Generator().manual_seed(seed)  # one global batch; each DP rank takes its share
    tokens = torch.randint(0, VOCAB, (MICROBATCHES, MICRO_BATCH, SEQ + 1), generator=gen)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tokens = tokens[dp_rank::dp]
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # a clone: the schedule rescales `loss` in place

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch[:, :-1], position_ids, None, labels=batch[:, 1:]), loss_func

    forward_backward = get_forward_backward_func()
    assert pp == 1 or forward_backward.__name__ == "forward_backward_pipelining_without_interleaving"  # 1F1B
    losses, grad_norms = [], []
    for _ in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        per_microbatch = forward_backward(
            forward_step_func=forward_step, data_iterator=iter(tokens), model=[model],
            num_microbatches=len(tokens), seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok
        grad_norms.append(grad_norm)
        if per_microbatch:
            losses.append(torch.stack([m["lm loss"] for m in per_microbatch]).mean().item())
    return ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), losses or None, grad_norms


@pytest.fixture(scope="module")
def reference_run():
    """The same model and batch at TP=1 x PP=1 on one rank."""
    ((_, _, losses, grad_norms),) = run_distributed(1, _train_tiny_gpt, 1, 1, STEPS)
    assert losses[-1] < losses[0]
    return losses, grad_norms


def test_gpt_trains_at_tp2_pp2_and_matches_tp1_pp1(reference_run):
    ref_losses, ref_norms = reference_run
    ranks = run_distributed(4, _train_tiny_gpt, 2, 2, STEPS)
    assert [(pp_rank, tp_rank) for pp_rank, tp_rank, _, _ in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(losses is None for pp_rank, _, losses, _ in ranks if pp_rank == 0)
    holders = [losses for pp_rank, _, losses, _ in ranks if pp_rank == 1]
    assert holders[0] == holders[1]  # bit-identical on the two TP ranks of the last stage
    losses = holders[0]
    assert losses[-1] < losses[0]
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)  # same weights, same batch
    assert losses == pytest.approx(ref_losses, rel=1e-4)  # same updates (clipped Adam) after it
    for _, _, _, norms in ranks:  # every rank clipped with the global grad norm of one rank
        assert norms == pytest.approx(ref_norms, rel=1e-4)


def test_gpt_data_parallel_shards_batch_and_matches_tp1_pp1(reference_run):
    # PP=2 x DP=2: each DP rank trains on half the microbatches; DDP averages the gradients and
    # the DistributedOptimizer updates only its half of the parameters, then gathers them.
    ref_losses, ref_norms = reference_run
    ranks = run_distributed(4, _train_tiny_gpt, 1, 2, STEPS)
    per_dp_rank = [losses for pp_rank, _, losses, _ in ranks if pp_rank == 1]
    assert len(per_dp_rank) == 2 and per_dp_rank[0] != per_dp_rank[1]  # different data
    mean_losses = [(a + b) / 2 for a, b in zip(*per_dp_rank)]
    assert mean_losses == pytest.approx(ref_losses, rel=1e-4)
    for _, _, _, norms in ranks:
        assert norms == pytest.approx(ref_norms, rel=1e-4)
