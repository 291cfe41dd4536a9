"""Install megatron_patch: Idefics2 on megatron-core (tensor, pipeline and data parallel)."""
from setuptools import find_packages, setup

setup(
    name="megatron_patch",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of Idefics2 vision-language models on megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # toolkits/: the command-line tools, importable as toolkits.<folder>.<tool> by each other, tests and bench.
    packages=find_packages(include=["megatron_patch", "megatron_patch.*", "toolkits", "toolkits.*"]),
    install_requires=[
        # torch is not pinned here: install the build for your machine first (see README).
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",  # 0.16 on Python 3.11; 0.17+ need Python 3.12 (both in CI)
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "webdataset>=0.2.100",
        "pyyaml",  # energon-prepared folders (.nv-meta)
        "fsspec>=2023.1",  # --data-path URLs (s3:// also needs s3fs, gs:// gcsfs, ...)
        "numpy",
        "pillow",
        "tqdm",
        "einops",
    ],
    extras_require={
        # Evaluation and plots (toolkits/eval); sacrebleu adds BLEU when installed.
        "eval": ["rouge-score>=0.1.2", "matplotlib>=3.7"],
        # megatron-energon interop: energon_prepare.py and reading with energon (docs/energon.md).
        "energon": ["megatron-energon>=7"],
        # Weights & Biases logging (--wandb-project).
        "wandb": ["wandb>=0.19"],
        # LoRA (--lora-*): peft reads and writes the adapter folders' format (docs/training.md).
        "lora": ["peft>=0.17"],
        # The test suite and the README's main job.
        "test": ["pytest>=8", "psutil>=5.9", "mistral-common>=1.5", "rouge-score>=0.1.2", "matplotlib>=3.7",
                 "tensorboard>=2.14", "megatron-energon>=7", "wandb>=0.19", "peft>=0.17"],
    },
)
