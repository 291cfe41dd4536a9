"""What the data path is built from: one frozen value instead of the argparse namespace.

    settings = DataSettings(data_path=["/data/shards"], micro_batch_size=2, seq_length=2048)
    encoder = encoder_from_settings(settings, tokenizer_dir)                  # encoder.py
    train, valid = build_train_valid_loaders(settings, encoder, collate, dp_rank, dp_size)  # loader.py

Training makes it once from its validated flags (``megatron_patch.training.settings.data_settings``);
the defaults are those of the flags (``loader.add_data_arguments``, ``encoder.add_encoder_arguments``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class DataSettings:
    """Settings of the loaders and the sample encoder (Megatron-style flag names)."""

    seq_length: int
    """Tokens per row (``--seq-length``): samples are cut or dropped to fit; packed rows hold this many."""
    micro_batch_size: int
    """Rows per micro-batch of one data-parallel rank (``--micro-batch-size``)."""
    data_path: Optional[Sequence[str]] = None
    """Training datasets, optionally weighted: ``["0.7", "dirA", "0.3", "dirB"]`` (``--data-path``);
    None: no training loader."""
    valid_data_path: Optional[Sequence[str]] = None
    """Validation datasets, read once in stored order (``--valid-data-path``); None: no validation loader."""
    seed: int = 1234
    """Data order and per-sample augmentation seed (``--seed``)."""
    num_workers: int = 2
    """DataLoader worker processes per loading rank (``--num-workers``); 0 reads in the main process."""
    max_bad_sample_fraction: float = 0.01
    """Damaged samples / samples read above which loading stops (``--max-bad-sample-fraction``)."""
    pack_sequences: bool = False
    """Pack several samples per ``seq_length`` row (``--pack-sequences``)."""
    pack_buffer_size: int = 256
    """Samples per first-fit-decreasing packing round (``--pack-buffer-size``)."""
    train_samples: Optional[int] = None
    """Samples the training loader yields in all (None: endless, the iteration count decides)."""
    answer_loss_only: bool = False
    """Train on assistant answers only (``--answer-loss-only``); default: every text token counts."""
    image_size: Optional[int] = None
    """Longest image edge after resizing (``--image-size``); None: the model folder's setting, else Idefics2's."""
    shortest_edge: Optional[int] = None
    """Floor for each image side (``--shortest-edge``); None: the model folder's setting, else Idefics2's."""
    image_splitting: Optional[bool] = None
    """Feed each image as 4 crops + the whole image (``--image-splitting``); None: the model folder's setting."""
    image_seq_len: Optional[int] = None
    """``<image>`` tokens per vision input = perceiver latents (``--image-seq-len``); None: the model folder's."""
