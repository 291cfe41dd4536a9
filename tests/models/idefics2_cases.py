"""Per-rank bodies of the Idefics2 model tests (run on N gloo ranks by the distributed harness)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.model import build_model
from megatron_patch.models.idefics2.model_loading import (
    assemble_hf_tensors,
    load_hf_weights,
    local_tensors,
    pipeline_layout,
)
from megatron_patch.platform import get_device, init_distributed
from megatron_patch.testing.parity import hf_outputs, max_abs_diffs, megatron_outputs, random_inputs
from megatron_patch.testing.tiny import randomize_weights, tiny_idefics2_config


def llama3_rope(factor: float) -> dict:
    """Llama-3.1/3.2 `rope_parameters` (transformers 5) at scaling `factor` (8 for 3.1, 32 for 3.2)."""
    return dict(rope_type="llama3", factor=float(factor), low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192, rope_theta=500000.0)


def with_rope(config, rope_parameters: dict):
    """A copy of `config` whose text model uses `rope_parameters`."""
    config = copy.deepcopy(config)
    config.text_config.rope_parameters = dict(rope_parameters)
    # Llama-3.1's context; transformers expects it above original_max_position_embeddings.
    config.text_config.max_position_embeddings = 131072
    return config


def tiny_hf_model(text: str, tied: bool, seed: int = 0, rope_parameters=None, sliding_window=None,
                  perceiver_kv_heads=None):
    from transformers import Idefics2ForConditionalGeneration

    config = tiny_idefics2_config(text, tie_word_embeddings=tied, perceiver_kv_heads=perceiver_kv_heads)
    config.text_config.sliding_window = sliding_window  # Mistral's field
    if rope_parameters is not None:
        config = with_rope(config, rope_parameters)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    randomize_weights(model, seed)
    return config, model


def build_from_hf(config, hf_model, opts: ParallelOptions, init_weights: bool = False):
    model = build_model(config, opts, init_weights=init_weights)
    state = hf_model.state_dict()
    load_hf_weights(model, state.__getitem__, config, opts)
    return model


def parity_case(text: str, tp: int, pp: int, num_images: int, tied: bool = False, first_stage_layers=None,
                rope=None, megatron_rope=None, text_tokens: int = 12, use_te: bool = False, sliding_window=None,
                perceiver_kv_heads=None):
    """Max abs diff per component between Megatron at tp x pp and transformers (on rank 0).

    `rope`: the text config's `rope_parameters`; `megatron_rope`: other ones for the Megatron model
    only (to show a RoPE setting matters); `text_tokens` per sample besides the image blocks;
    `use_te`: transformer-engine layers (the Megatron model on this rank's device, CUDA with TE);
    `sliding_window`: Mistral's, for both models; `perceiver_kv_heads`: the perceiver's KV heads.
    """
    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model(text, tied, rope_parameters=rope, sliding_window=sliding_window,
                                     perceiver_kv_heads=perceiver_kv_heads)
    opts = ParallelOptions(tp, pp, decoder_first_pipeline_num_layers=first_stage_layers, use_transformer_engine=use_te)
    megatron_config = config if megatron_rope is None else with_rope(config, megatron_rope)
    device = get_device()
    model = build_from_hf(megatron_config, hf_model, opts).to(device).eval()
    inputs = random_inputs(config, batch_size=2, num_images=num_images, text_tokens=text_tokens, seed=7)
    ours = megatron_outputs([model], {k: v.to(device) for k, v in inputs.items()}, config.text_config.vocab_size)
    if dist.get_rank() != 0:
        return None
    reference = hf_outputs(hf_model, inputs)
    diffs = max_abs_diffs(ours, reference)
    diffs["logit_std"] = float(reference["logits"].std())
    return diffs


def _shifted(inputs):
    """Megatron-style labels: labels[i] is the token after position i; the last position counts nothing."""
    ids = inputs["input_ids"]
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones_like(ids, dtype=torch.float32)
    loss_mask[:, -1] = 0
    return labels, loss_mask


def _wrap_ddp(model):
    """megatron-core DDP plus training's grad finalisation (TP all-reduce of sequence-parallel norm
    grads, tied-embedding sync, the sum over replicated perceiver KV copies)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_patch.training.optimizer import finalize_grads

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(overlap_grad_reduce=False), model)
    model.config.finalize_model_grads_func = finalize_grads
    return ddp


def train_micro_batch(chunk, config):
    """Forward and backward of `random_inputs(seed=11)` (the batch of `hf_loss_and_grads`) through the
    pipeline; the mean per-token loss on the last stage, None on the others."""
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=11)
    labels, loss_mask = _shifted(inputs)
    batch_size, seq_len = labels.shape
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(batch_size, -1)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        losses = chunk(
            batch["input_ids"], position_ids, batch["pixel_values"], batch["pixel_attention_mask"],
            batch["image_mask"], labels=labels,
        )

        def loss_func(per_token):
            loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
            return loss, {"loss": loss.detach()}

        return losses, loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([inputs]),
        model=[chunk],
        num_microbatches=1,
        seq_length=seq_len,
        micro_batch_size=batch_size,
        forward_only=False,
    )
    loss = float(out[0]["loss"]) if parallel_state.is_pipeline_last_stage() else None
    return loss


def loss_and_grads_case(text: str, tp: int, pp: int, tied: bool = False, ddp: bool = False, sliding_window=None,
                        perceiver_kv_heads=None, **options):
    """Loss and HF-named gradients of one training micro-batch at tp x pp (on rank 0).

    `options` are extra ParallelOptions fields (activation recompute, sequence parallel, ...); with
    `ddp` the model runs inside megatron-core's DDP and grads are finalised as in training.
    """
    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model(text, tied, sliding_window=sliding_window, perceiver_kv_heads=perceiver_kv_heads)
    opts = ParallelOptions(tp, pp, **options)
    model = build_from_hf(config, hf_model, opts)
    chunk = _wrap_ddp(model) if ddp else model
    loss = train_micro_batch(chunk, config)
    mine = {
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(), k): v
        for k, v in local_tensors(model, opts, grads=True).items()
    }
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((loss, mine), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    shards = {}
    for rank_loss, part in gathered:
        loss = rank_loss if rank_loss is not None else loss
        shards.update(part)
    # Finalised grads already hold the tied head's sum on both stages; raw ones must be summed here.
    grads = assemble_hf_tensors(shards, config, pipeline_layout(config, opts), tp, sum_tied=not ddp)
    return loss, grads


def hf_loss_and_grads(text: str, tied: bool = False, sliding_window=None, perceiver_kv_heads=None):
    """The same micro-batch through transformers' Idefics2: loss and gradients by HF name."""
    config, hf_model = tiny_hf_model(text, tied, sliding_window=sliding_window, perceiver_kv_heads=perceiver_kv_heads)
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=11)
    out = hf_model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        pixel_attention_mask=inputs["pixel_attention_mask"],
        labels=inputs["input_ids"],
    )
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in hf_model.named_parameters()}
    return float(out.loss), grads


def attention_dropout_case(tower: str, tp: int):
    """Max abs changes of (vision, connector, logits) between two training-mode forwards of one batch,
    and between eval mode and a dropout-free model, with `attention_dropout` 0.5 in `tower`'s HF config
    ("vision_config", "perceiver_config" or "text_config") only (on rank 0)."""
    init_distributed(tp, 1, seed=1234)
    config, hf_model = tiny_hf_model("mistral", False)
    plain = build_from_hf(config, hf_model, ParallelOptions(tp, 1)).eval()
    getattr(config, tower).attention_dropout = 0.5
    model = build_from_hf(config, hf_model, ParallelOptions(tp, 1))
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=7)
    vocab = config.text_config.vocab_size
    first, second = (megatron_outputs([model.train()], inputs, vocab) for _ in range(2))
    evaluated, reference = megatron_outputs([model.eval()], inputs, vocab), megatron_outputs([plain], inputs, vocab)
    if dist.get_rank() != 0:
        return None
    return {"train_vs_train": max_abs_diffs(first, second), "eval_vs_no_dropout": max_abs_diffs(evaluated, reference)}


def hf_sliding_window_effect(window: int, text_tokens: int) -> float:
    """Max abs difference of transformers' logits with Mistral's sliding window and without it."""
    inputs, logits = None, []
    for w in (window, None):
        config, hf_model = tiny_hf_model("mistral", False, sliding_window=w)
        inputs = random_inputs(config, batch_size=2, num_images=2, text_tokens=text_tokens, seed=7)
        logits.append(hf_outputs(hf_model, inputs)["logits"])
    return float((logits[0] - logits[1]).abs().max())


def image_token_mismatch_case():
    """Forward a sample whose <image> tokens were cut: returns the error message."""
    from megatron_patch.models.idefics2.model import ImageTokenMismatch

    init_distributed(1, 1, seed=1234)
    config, hf_model = tiny_hf_model("mistral", False)
    model = build_from_hf(config, hf_model, ParallelOptions())
    inputs = random_inputs(config, batch_size=2, num_images=2, seed=3)
    ids = inputs["input_ids"].clone()
    first_image = int((ids[1] == config.image_token_id).nonzero()[0])
    ids[1, first_image] = 0  # one <image> token of sample 1 lost, as truncation would do
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand(2, -1)
    try:
        model(ids, position_ids, inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["image_mask"])
    except ImageTokenMismatch as e:
        return str(e)
    return None


def pack_rows(inputs: dict, rows: list[list[int]]):
    """Pack samples of `inputs` into rows (sample indices per row), as the data collator does:
    tokens back to back, position ids restarting per sample, images in sample order, a padding
    tail that is its own segment, and cu_seqlens over the b-major flattened tokens."""
    ids, mask, pixels, pixel_mask = (inputs[k] for k in ("input_ids", "image_mask", "pixel_values", "pixel_attention_mask"))
    seq = ids.shape[1]
    width = max(len(r) for r in rows) * seq
    max_images = max(int(mask[r].sum()) for r in rows)
    out_ids = torch.zeros(len(rows), width, dtype=ids.dtype)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    out_pixels = pixels.new_zeros(len(rows), max_images, *pixels.shape[2:])
    out_pixel_mask = pixel_mask.new_zeros(len(rows), max_images, *pixel_mask.shape[2:])
    out_mask = torch.zeros(len(rows), max_images, dtype=torch.bool)
    cu = [0]
    for r, samples in enumerate(rows):
        images = torch.cat([pixels[b][mask[b]] for b in samples])
        out_pixels[r, : len(images)] = images
        out_pixel_mask[r, : len(images)] = torch.cat([pixel_mask[b][mask[b]] for b in samples])
        out_mask[r, : len(images)] = True
        for k, b in enumerate(samples):
            out_ids[r, k * seq : (k + 1) * seq] = ids[b]
            positions[r, k * seq : (k + 1) * seq] = torch.arange(seq)
            cu.append(r * width + (k + 1) * seq)
        if len(samples) * seq < width:
            positions[r, len(samples) * seq :] = torch.arange(width - len(samples) * seq)
            cu.append((r + 1) * width)
    cu = torch.tensor(cu, dtype=torch.int32)
    packed = {"input_ids": out_ids, "position_ids": positions, "pixel_values": out_pixels,
              "pixel_attention_mask": out_pixel_mask, "image_mask": out_mask,
              "cu_seqlens": cu}
    return packed


def packed_vs_unpacked_case(tp: int, pp: int, sliding_window=None):
    """Logits of 3 samples run one per row, and packed two rows as [s0 s1] [s2 pad] (on rank 0)."""
    from megatron_patch.testing.parity import megatron_outputs

    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model("mistral", False, sliding_window=sliding_window)
    model = build_from_hf(config, hf_model, ParallelOptions(tp, pp)).eval()
    inputs = random_inputs(config, batch_size=3, num_images=2, seed=5)
    vocab = config.text_config.vocab_size
    alone = megatron_outputs([model], inputs, vocab)
    packed = megatron_outputs([model], pack_rows(inputs, [[0, 1], [2]]), vocab)
    if dist.get_rank() != 0:
        return None
    seq = inputs["input_ids"].shape[1]
    from_packed = torch.stack([packed["logits"][0, :seq], packed["logits"][0, seq:], packed["logits"][1, :seq]])
    return alone["logits"], from_packed


def fused_loss_and_grads_case(text: str, tp: int, pp: int, tied: bool = False):
    """`loss_and_grads_case` with megatron-core's bias fusions on, their functions run eagerly.

    torch.compile is disabled here: on CPU it compiles C++ (tens of seconds) and on a GPU it would
    generate Triton kernels instead, so what this can check on CPU is the fused functions' own
    formulas and hand-written backwards, which are what "keep the numbers" depends on.
    """
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        return loss_and_grads_case(text, tp, pp, tied, bias_fusions=True)


def init_off_then_load_case(tp: int, pp: int) -> dict:
    """Load the same HF weights into a model built with random init and one built without it, whose
    every tensor was first set to NaN; what differs between the two on this rank, what is still NaN."""
    init_distributed(tp, pp, seed=1234)
    config, hf_model = tiny_hf_model("llama", True)
    opts = ParallelOptions(tp, pp)
    initialised = build_model(config, opts, init_weights=True)
    bare = build_model(config, opts, init_weights=False)
    with torch.no_grad():
        for tensor in bare.state_dict().values():
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                tensor.fill_(float("nan"))
    state = hf_model.state_dict()
    for model in (initialised, bare):
        load_hf_weights(model, state.__getitem__, config, opts)
    # megatron-core's `_extra_state` entries are None (local layers); only tensors hold weights.
    ref, got = ({k: v for k, v in m.state_dict().items() if torch.is_tensor(v)} for m in (initialised, bare))
    return {
        "perform_initialization": [c.perform_initialization for c in (bare.configs.vision, bare.configs.language)],
        "same_keys": sorted(ref) == sorted(got),
        "tensors": len(got),
        "differ": [k for k in ref if not torch.equal(ref[k], got[k])],
        "nan": [k for k, v in got.items() if v.isnan().any()],
        # megatron-core marks TP-split weights only inside its init functions; the grad norm and
        # clipping count an unmarked weight as a TP duplicate (on TP rank 0 only).
        "tp_attributes_differ": [(n, _tp_attributes(a), _tp_attributes(b)) for (n, a), (_, b) in zip(initialised.named_parameters(), bare.named_parameters())
                                 if _tp_attributes(a) != _tp_attributes(b)],
    }


def _tp_attributes(param) -> tuple:
    return tuple(getattr(param, k, None) for k in ("tensor_model_parallel", "partition_dim", "partition_stride"))
