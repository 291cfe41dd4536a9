"""What the checkpoint tools (hf2mcore, mcore2hf, compose, check_hf_parity) share and training does not.

- hf_files.py    Hugging Face safetensors folders: read lazily, write sharded with an index.
- read_once.py   each source tensor read exactly once (mappings grouped by what they read; the count checked).
- publish.py     the output built aside, compared with what is there, renamed into place.
- tooling.py     command-line plumbing: sizes, progress bars, one closing summary, one-line error exits.

The Megatron side (layout, per-rank files, resharding loads, the expected shapes and their check)
is `megatron_patch.checkpoint`, which training uses too.
"""
