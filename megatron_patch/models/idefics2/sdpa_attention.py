"""Core attention on `torch.nn.functional.scaled_dot_product_attention`, for the local layer specs.

A drop-in for megatron-core's unfused `DotProductAttention` (same constructor and `forward`, inputs
[s, b, heads, dim] per TP rank, output [s, b, heads * dim]) that never builds the score matrix itself:
SDPA picks a fused kernel (flash / memory-efficient on CUDA, a blocked flash kernel on CPU) and keeps
only blocks of scores alive. The numbers are those of the unfused path:

- causal self-attention without an explicit mask: `is_causal=True` (no `[s, s]` mask is made);
- grouped-query attention: `enable_gqa=True`, so K/V are not repeated per query head;
- an explicit megatron-core mask (bool, True = masked; [b, 1, 1, s] key padding for the vision tower,
  or any [b, 1, s, s]) becomes SDPA's keep-mask (True = attend);
- packed rows (several samples per row) come as `PackedRows` (`row_segments`, made once per
  micro-batch): segments grouped by length, each group gathered into a padded batch [segments, heads,
  its longest, dim] and run with `is_causal=True`, so no [s, s] mask exists and the work follows the
  sum of squared segment lengths (at most ~2x it), not segments x the longest's square.
  A real query of a segment padded at its end sees only earlier keys, all real: no mask is needed.
- sliding-window causal attention (`config.window_size = (W - 1, 0)`, Mistral's `sliding_window` W: a
  query sees itself and the W - 1 keys before it): when a sequence (or packed segment) is longer than
  W, queries run in blocks of W; the first block is plain causal, each later one attends its 2W - 1
  keys through one [W, 2W - 1] band mask. The work is at most twice the window's, never the
  sequence's square, and no [s, s] mask exists.

The unfused path fills masked scores with -10000 rather than -inf; the two agree except on a query row
whose every key is masked, which none of this model's masks produce (a vision image has at least one
real patch; a packed token always sees itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


# `enable_gqa` arrived in torch 2.5; older torch repeats K/V per query head as the unfused path does.
_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def keep_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """megatron-core mask (bool, True = masked) -> SDPA's boolean mask (True = attend)."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        raise ValueError(
            f"SDPA core attention expects megatron-core's boolean attention mask (True = masked), "
            f"got dtype {attention_mask.dtype}"
        )
    return ~attention_mask


@dataclass
class PackedRows(PackedSeqParams):
    """megatron-core's packed-sequence params (sbhd) plus the plan SDPAttention runs them by, made
    once per micro-batch (`row_segments`) and shared by every layer: segments grouped by length, each
    group padded only to its own longest, so the work follows the sum of squared segment lengths.

    groups: per group, (gather index [n, L] into the b-major flattened tokens, with `total` for padding;
            keep [n, L], True at real tokens). real: per group, (segment, position) index pair of its
            real tokens in keep's order (`keep`'s True entries, as long indices: picking them needs no
            host sync). restore: where each token's output sits in the concatenation of every group's
            real tokens (an inverse permutation)."""

    groups: tuple = ()
    real: tuple = ()
    restore: Optional[torch.Tensor] = None


_GROUP_RATIO = 0.7
"""A segment joins a group whose longest is L when it has at least 0.7 L tokens, so padding costs at
most 1 / 0.7^2 ~ 2x its own attention, and lengths from 1 to 4,096 make at most ~24 groups."""


def _length_groups(lengths: list[int], by_length: bool) -> list[list[int]]:
    """Segment indices grouped for padding, longest first (one group of all when not `by_length`)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not by_length:
        return [order]
    groups = []
    for i in order:
        if groups and lengths[i] >= _GROUP_RATIO * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def row_segments(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int, by_length: bool = True,
                 device=None) -> PackedRows:
    """Packed rows [b, s] as SDPAttention's segment params: `cu_seqlens` (boundaries over the b-major
    flattened [b * s] tokens, covering all of them) split at every row end too, so that no segment
    crosses rows; `max_seqlen_*` is the row length (megatron-core sizes RoPE by it; positions run
    along the row, as without packing). `by_length=False` pads every segment to the longest in one
    group (what this code did before grouping; benches compare the two).

    The plan is made on the host from the boundaries' values and copied to `device` (default:
    `cu_seqlens`'); keep `cu_seqlens` on the host and nothing here waits for the device (reading a
    device tensor's values is a host sync, once per micro-batch; the layers reuse the plan)."""
    total = batch_size * seq_len
    device = cu_seqlens.device if device is None else torch.device(device)
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must run from 0 to batch x seq_length = {total} (pad tokens included), "
            f"got {bounds[0]} .. {bounds[-1]}"
        )
    bounds = sorted(set(bounds) | set(range(0, total + 1, seq_len)))
    starts_all, lengths = bounds[:-1], [b - a for a, b in zip(bounds, bounds[1:])]
    groups, picks, tokens = [], [], []
    for members in _length_groups(lengths, by_length):
        longest = lengths[members[0]]
        starts = torch.tensor([starts_all[i] for i in members])
        sizes = torch.tensor([lengths[i] for i in members])
        offsets = torch.arange(longest)
        keep = offsets[None, :] < sizes[:, None]
        index = torch.where(keep, starts[:, None] + offsets[None, :], total)
        groups.append((index, keep))
        count = sum(lengths[i] for i in members)
        picks.append((torch.repeat_interleave(torch.arange(len(members)), sizes, output_size=count),
                      torch.cat([torch.arange(lengths[i]) for i in members])))  # keep's True entries, in order
        tokens += [torch.arange(starts_all[i], starts_all[i] + lengths[i]) for i in members]  # = index[keep]
    restore = torch.empty(total, dtype=torch.long)
    restore[torch.cat(tokens)] = torch.arange(total)

    def move(t):
        return t.to(device, non_blocking=True)

    cu = move(torch.tensor(bounds, dtype=cu_seqlens.dtype))
    return PackedRows(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq_len, max_seqlen_kv=seq_len,
                      groups=tuple((move(index), move(keep)) for index, keep in groups),
                      real=tuple((move(rows), move(cols)) for rows, cols in picks), restore=move(restore))


def _keys_per_query(config: TransformerConfig, attn_mask_type: AttnMaskType) -> Optional[int]:
    """Keys a query sees under `config.window_size` (None: no window). Only causal windows are taken:
    (left, 0), a query seeing itself and `left` keys before it; (-1, 0) is no window."""
    window = getattr(config, "window_size", None)
    if window is None:
        return None
    left, right = (int(w) for w in window)
    if right != 0 or left < -1:
        raise ValueError(f"config.window_size {tuple(window)} is not supported by the SDPA core attention; "
                         f"only causal sliding windows (left, 0) are")
    if getattr(config, "window_attn_skip_freq", None) is not None:
        raise ValueError("config.window_attn_skip_freq (full-attention layers among windowed ones) is not "
                         "supported by the SDPA core attention")
    if left == -1:
        return None
    if attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"a sliding window needs causal attention, got attn_mask_type {attn_mask_type.name}")
    return left + 1


def _band_mask(window: int, device) -> torch.Tensor:
    """[W, 2W - 1] keep-mask of a query block of W against its keys starting W - 1 tokens earlier:
    query r sees keys r .. r + W - 1 (itself is key r + W - 1)."""
    r = torch.arange(window, device=device)[:, None]
    c = torch.arange(2 * window - 1, device=device)[None, :]
    return (c >= r) & (c <= r + window - 1)


class SDPAttention(MegatronModule):
    """megatron-core core attention (`DotProductAttention`'s interface) computed by torch SDPA."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "--context-parallel-size > 1 needs transformer-engine attention; "
                "use --transformer-impl transformer_engine or --context-parallel-size 1"
            )
        self.window = _keys_per_query(config, attn_mask_type)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported by the SDPA core attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)

        # With apply_query_key_layer_scaling the unfused path divides the scale by the layer number and
        # multiplies it back inside its softmax: the net scale is the same.
        self.softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else softmax_scale
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def _shape_check(self, query: torch.Tensor, key: torch.Tensor) -> None:
        heads, groups = query.shape[2], key.shape[2]
        if heads != self.num_attention_heads_per_partition or heads % groups != 0:
            raise ValueError(
                f"SDPA core attention got {heads} query heads and {groups} key/value heads per TP rank; "
                f"expected {self.num_attention_heads_per_partition} query heads in groups of equal size"
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if packed_seq_params is not None and packed_seq_params.qkv_format != "sbhd":
            raise ValueError(
                f"SDPA core attention takes packed rows as sbhd segments (row_segments), "
                f"not qkv_format {packed_seq_params.qkv_format!r}"
            )
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by the SDPA core attention")
        self._shape_check(query, key)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        # As megatron-core's softmax: a causal mask is made only when none is given and sq > 1
        # (sq == 1 is a decoding step that sees every cached key).
        is_causal = mask_type == AttnMaskType.causal and attention_mask is None and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"causal self-attention needs as many queries as keys, got {sq} and {sk}")
        if self.window is not None and not is_causal:
            raise ValueError("the sliding window applies to causal self-attention over a whole sequence; "
                             "this call has an explicit attention mask or a single query")

        if packed_seq_params is not None:
            if attention_mask is not None or mask_type != AttnMaskType.causal:
                raise ValueError("packed rows (sbhd segments) are causal and take no attention mask")
            if not isinstance(packed_seq_params, PackedRows):
                raise ValueError("packed rows must come as sdpa_attention.row_segments(...) (segments grouped once per "
                                 f"micro-batch), got {type(packed_seq_params).__name__}")
            return self._segments_forward(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d] (views; SDPA accepts the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        return self._attend(q, k, v, keep_mask(attention_mask), is_causal).permute(2, 0, 1, 3).reshape(
            sq, query.shape[1], self.hidden_size_per_partition
        )

    def _segments_forward(self, query, key, value, packed: PackedRows) -> torch.Tensor:
        """Causal attention inside each segment of the b-major flattened rows -> [s, b, np * hn]: one
        SDPA call per length group, each padded to its own longest; a real query of a segment padded
        at its end sees only earlier keys, all real, so no mask is needed."""
        s, b = query.shape[:2]
        if key.shape[0] != s:
            raise ValueError(f"packed rows need as many keys as queries, got {key.shape[0]} and {s}")

        def flat(x):  # [s, b, h, d] -> [b * s + 1, h, d]: b-major tokens, then one zero row for padding
            tokens = x.transpose(0, 1).reshape(s * b, *x.shape[2:])
            return torch.cat([tokens, tokens.new_zeros(1, *x.shape[2:])])

        q, k, v = flat(query), flat(key), flat(value)
        outputs = []
        for (index, _), real in zip(packed.groups, packed.real):
            grouped = [t[index].transpose(1, 2) for t in (q, k, v)]  # [n, h, L, d]
            context = self._attend(*grouped, None, is_causal=index.shape[1] > 1)
            outputs.append(context.transpose(1, 2)[real])  # the group's real tokens [real, h, d]
        context = torch.cat(outputs)[packed.restore]  # [b * s, h, d] in token order
        return context.reshape(b, s, self.hidden_size_per_partition).transpose(0, 1).contiguous()

    def _attend(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        """SDPA on [b, h, s, d] with GQA, scale, the sliding window (causal only) and (in training)
        dropout -> [b, h, sq, d]."""
        w = self.window
        if w is None or not is_causal or q.shape[2] <= w:
            return self._sdpa(q, k, v, mask, is_causal)
        band = _band_mask(w, q.device)
        blocks = [self._sdpa(q[:, :, :w], k[:, :, :w], v[:, :, :w], None, True)]
        for start in range(w, q.shape[2], w):
            n = min(w, q.shape[2] - start)
            keys = slice(start - w + 1, start + n)
            blocks.append(self._sdpa(q[:, :, start:start + n], k[:, :, keys], v[:, :, keys],
                                     band[:n, :n + w - 1], False))
        return torch.cat(blocks, dim=2)

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        gqa = {}
        if q.shape[1] != k.shape[1]:
            if _HAS_ENABLE_GQA and mask is None:
                gqa = {"enable_gqa": True}
            else:  # with a mask (the window's band) CUDA's fused kernels take repeated K/V, not enable_gqa
                # (which would send the call to the math kernel and its fp32 [b, h, sq, sk] scores)
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                **gqa,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG stream as the unfused path: TP ranks hold different heads, so they drop differently.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()
