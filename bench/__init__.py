"""Benchmark scripts, each writing a JSON result under bench/results/; run from the repository root as
`python -m bench.<script>` (figures in BENCHMARKS.md)."""
