"""Training with the perceiver's KV heads replicated over TP (TP > its KV heads) equals training at TP 1:
5 Adam iterations of a tiny model with 1 perceiver KV head at TP 2 x DP 2 and TP 4 log the TP 1
losses and grad norms; the copies stay identical in weights and optimizer state; a run resumes at
another TP with its optimizer state; a checkpoint whose copies differ is refused at load."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_patch.checkpoint.model_files import INDEX_FILE, RankReader
from megatron_patch.checkpoint.reshard import ShardedCheckpoint
from tests.checkpoint.fixtures import tool
from tests.distributed_harness import DistributedError, run_distributed
from tests.training.fixtures import train_flags, training_inputs
from tests.training.runs import by_iteration, loaded_optimizer_state, saved_optimizer_state, train

pytestmark = pytest.mark.distributed


KEYS = ("param", "exp_avg", "exp_avg_sq")
KV = [f"connector.perceiver.layers.{i}.self_attention.linear_kv.weight" for i in range(2)]
ITERS = 5


def exact_grad_norm(ctx):
    """Patch for `train`: megatron-core's grad norm (its selection of parameters: what is under test)
    with the squares summed in float64. Its CPU fallback sums fp32 `torch.norm`s, which are off by
    about 1e-5 relative at these sizes even at TP 1: more than the tolerance the layouts are held to."""
    from megatron.core.optimizer import clip_grads

    original = clip_grads.l2_norm_impl

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        total = sum(float(t.double().pow(2).sum()) for t in tensor_lists[0])
        return torch.tensor([total ** 0.5], dtype=torch.float32), None

    clip_grads.l2_norm_impl = l2_norm
    return lambda: setattr(clip_grads, "l2_norm_impl", original)


def _train(world, flags):
    run_distributed(world, train, flags, exact_grad_norm)


@pytest.fixture(scope="module")
def kv1(tmp_path_factory):
    """Training inputs with a model whose perceiver has 1 KV head (of 4 query heads; Llama-style text
    with 4 KV heads, so TP 4 fits the text model), converted at TP 1; and the TP 1 reference run."""
    root = tmp_path_factory.mktemp("kv1")
    inputs = dict(training_inputs())
    hf, mg = root / "hf", root / "mg"
    tool("idefics2/make_tiny_checkpoint.py").main(["--save-path", str(hf), "--tokenizer", "mistral", "--text", "llama",
                                                   "--perceiver-kv-heads", "1"])
    assert tool("idefics2/hf2mcore.py").main(["--load-path", str(hf), "--save-path", str(mg)]) == 0
    inputs.update(hf=hf, mg=mg)
    _train(1, train_flags(inputs, root / "tp1", iters=ITERS))
    return inputs, root


def _flags(inputs, save, tp, extra=()):
    return train_flags(inputs, save, tp=tp, iters=ITERS, extra=["--save-interval", "2", *extra])


def _assert_same_run(got, want, iterations):
    assert sorted(got) == iterations, sorted(got)
    for i in iterations:
        assert got[i]["lm_loss"] == pytest.approx(want[i]["lm_loss"], rel=1e-5), i
        assert got[i]["grad_norm"] == pytest.approx(want[i]["grad_norm"], rel=1e-5), i


def _assert_copies_identical(iteration_dir, tp):
    """Every TP rank's copy of the one KV head holds the same weight and the same optimizer state."""
    for name in KV:
        weights = ShardedCheckpoint(iteration_dir).mcore_shards(0, name)
        assert len(weights) == tp and all(torch.equal(w, weights[0]) for w in weights), name
    # Merging refuses copies that differ (tests/models/test_perceiver_kv_replication.py), so this reads
    # each moment of the copies only if they are equal on every rank.
    state = saved_optimizer_state(iteration_dir, KEYS)
    k_proj = "model.connector.perceiver_resampler.layers.0.self_attn.k_proj.weight"
    assert all(float(state[key][k_proj].abs().sum()) > 0 for key in KEYS)


@pytest.fixture(scope="module")
def run_at(kv1, tmp_path_factory):
    """run_at(tp, world, *extra) -> the folder of that 5-iteration run (saved at 2 and 4), trained once."""
    inputs, _ = kv1
    done = {}

    def get(tp, world, *extra):
        key = (tp, world, extra)
        if key not in done:
            done[key] = tmp_path_factory.mktemp(f"tp{tp}") / "run"
            _train(world, _flags(inputs, done[key], tp, extra))
        return done[key]

    return get


@pytest.mark.parametrize("tp, world, extra", [(2, 4, ["--use-distributed-optimizer"]), (4, 4, [])],
                         ids=["tp2-dp2-distopt", "tp4"])
def test_five_adam_steps_equal_tp1_and_copies_stay_identical(kv1, run_at, tp, world, extra):
    _, root = kv1
    run = run_at(tp, world, *extra)
    want, got = by_iteration(root / "tp1" / "metrics.jsonl"), by_iteration(run / "metrics.jsonl")
    _assert_same_run(got, want, list(range(1, ITERS + 1)))
    assert want[ITERS]["lm_loss"] < want[1]["lm_loss"]
    _assert_copies_identical(run / "iter_0000004", tp)


def test_resume_at_tp2_keeps_optimizer_state(kv1, run_at, tmp_path):
    inputs, run = kv1[0], run_at(4, 4)
    saved = saved_optimizer_state(run / "iter_0000002", KEYS)  # merged from the TP 4 copies (checked equal)
    flags = _flags(inputs, tmp_path / "resumed", 2, ["--load", str(run), "--iteration", "2"])
    loaded = run_distributed(2, loaded_optimizer_state, flags)[0]
    for key in KEYS:
        assert sorted(loaded[key]) == sorted(saved[key])
        for name, tensor in saved[key].items():
            assert torch.equal(loaded[key][name], tensor), (key, name)
    _train(2, flags)
    want, got = by_iteration(run / "metrics.jsonl"), by_iteration(tmp_path / "resumed" / "metrics.jsonl")
    _assert_same_run(got, want, [3, 4, 5])


def test_perturbed_copy_is_refused_at_load_in_one_line(kv1, run_at, tmp_path):
    inputs, run = kv1[0], run_at(4, 4)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    rank_dir = broken / "iter_0000004" / "mp_rank_01"  # loaded with --iteration 4 below
    path = rank_dir / RankReader(rank_dir, INDEX_FILE).weight_map[KV[1]]
    tensors = load_file(str(path))
    tensors[KV[1]][0, 0] += 1e-3
    save_file(tensors, str(path))
    with pytest.raises(DistributedError) as err:
        run_distributed(1, train, _flags(inputs, tmp_path / "out", 1, ["--load", str(broken), "--iteration", "4"]))
    lines = [line for line in str(err.value).splitlines() if line.startswith("megatron_patch.checkpoint.errors.CheckpointError")]
    assert len(lines) == 1, str(err.value)[-2000:]
    assert KV[1] in lines[0] and "TP rank 1" in lines[0] and str(broken / "iter_0000004") in lines[0], lines[0]
