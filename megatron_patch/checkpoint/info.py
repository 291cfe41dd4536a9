"""`checkpoint_info.json`: what one iteration folder holds, so loading needs no layout flags.

    {
      "format": "megatron_patch.idefics2.per_rank_safetensors",
      "format_version": 1,
      "model_type": "idefics2",
      "iteration": 10,                              (or "release")
      "tensor_model_parallel_size": 2,
      "pipeline_model_parallel_size": 2,
      "decoder_first_pipeline_num_layers": null,    (LLM layers on stage 0 when uneven)
      "num_tensors": 412,                           (over all rank folders)
      "total_bytes": 16060000000,
      "created_by": "hf2mcore",
      "lora": null                                  (a LoRA checkpoint: its adapters and base, adapters.py)
    }
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megatron_patch.checkpoint.errors import CheckpointError
from megatron_patch.checkpoint.layout import Iteration, parse_iteration, write_durable
from megatron_patch.models.idefics2.config import ParallelOptions
from megatron_patch.models.idefics2.weight_mapping import PipelineLayout

INFO_FILE = "checkpoint_info.json"
FORMAT = "megatron_patch.idefics2.per_rank_safetensors"
FORMAT_VERSION = 1
_LORA_KEYS = ("rank", "alpha", "dropout", "targets", "modules_to_save", "base")


@dataclass(frozen=True)
class CheckpointInfo:
    iteration: Iteration
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    decoder_first_pipeline_num_layers: Optional[int] = None
    num_tensors: int = 0
    total_bytes: int = 0
    created_by: str = ""
    lora: Optional[dict] = None  # a LoRA checkpoint: rank, alpha, dropout, targets, modules_to_save, base
    model_type: str = "idefics2"
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def parallel_options(self, **overrides) -> ParallelOptions:
        """The layout this checkpoint was saved at, as model options."""
        return ParallelOptions(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            decoder_first_pipeline_num_layers=self.decoder_first_pipeline_num_layers,
            **overrides,
        )

    @property
    def adapter_targets(self) -> Optional[tuple]:
        """The projections a LoRA checkpoint's adapters sit on (None: a full checkpoint)."""
        return None if self.lora is None else tuple(self.lora["targets"])

    @property
    def modules_to_save(self) -> tuple:
        """The modules a LoRA checkpoint's run trained fully (it holds them beside the adapters)."""
        return () if self.lora is None else tuple(self.lora["modules_to_save"])

    def pipeline_layout(self, hf_config) -> PipelineLayout:
        return PipelineLayout(
            hf_config.text_config.num_hidden_layers,
            self.pipeline_model_parallel_size,
            self.decoder_first_pipeline_num_layers,
        )

    def same_layout(self, other: "CheckpointInfo") -> bool:
        return (self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.decoder_first_pipeline_num_layers) == (
            other.tensor_model_parallel_size, other.pipeline_model_parallel_size, other.decoder_first_pipeline_num_layers
        )

    def write(self, folder) -> None:
        path = Path(folder) / INFO_FILE
        write_durable(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder) -> "CheckpointInfo":
        path = Path(folder) / INFO_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder} is not a megatron_patch checkpoint iteration")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path} does not describe a {FORMAT} checkpoint (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has format_version {data.get('format_version')!r}; this code reads version {FORMAT_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path} has unknown field {unknown[0]!r}")
        for key in ("iteration", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if key not in data:
                raise CheckpointError(f"{path} lacks the field {key!r}")
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if not isinstance(data[key], int) or data[key] < 1:
                raise CheckpointError(f"{path}: {key} must be a positive integer, got {data[key]!r}")
        lora = data.get("lora")
        if lora is not None and (not isinstance(lora, dict) or any(k not in lora for k in _LORA_KEYS)):
            raise CheckpointError(f"{path}: lora must hold {', '.join(_LORA_KEYS)}, got {lora!r}")
        data["iteration"] = parse_iteration(data["iteration"])
        return cls(**data)
