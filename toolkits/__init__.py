"""Command-line tools around training: data preprocessing, checkpoint conversion, evaluation, layout planning.

Each tool runs as a script (`python toolkits/.../tool.py`, as the README shows); `pip install -e .`
installs this package beside `megatron_patch`, so the tools import each other and tests and
benchmarks import them as `toolkits.<folder>.<tool>`.
"""
