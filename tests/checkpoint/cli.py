"""Run the converters in-process and check how they end: one `error:` line, nothing left behind."""
from __future__ import annotations

from tests.checkpoint.fixtures import tool


def hf2mcore(src, dst, tp=1, pp=1, *extra):
    return tool("idefics2/hf2mcore.py").main([
        "--load-path", str(src), "--save-path", str(dst), "--target-tensor-model-parallel-size", str(tp),
        "--target-pipeline-model-parallel-size", str(pp), *extra,
    ])


def mcore2hf(src, dst, *extra):
    return tool("idefics2/mcore2hf.py").main(["--load-path", str(src), "--save-path", str(dst), *extra])


PERCEIVER = ["--perceiver-latents", "4", "--perceiver-depth", "2", "--perceiver-heads", "4",
             "--perceiver-head-dim", "8", "--perceiver-kv-heads", "2"]  # a tiny connector


def compose(llm, vision, out, *extra):
    return tool("idefics2_llama3/compose.py").main(
        ["--llm-path", str(llm), "--vision-path", str(vision), "--save-path", str(out), *PERCEIVER, *extra]
    )


def error_line(capsys) -> str:
    """The one `<tool>: error: ...` line of stderr; it must be the last line (no continuation lines)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if ": error: " in line]
    assert len(errors) == 1, lines[-5:]
    assert errors[0] == len(lines) - 1, lines[errors[0]:]
    return lines[-1]


def assert_nothing_written(parent, name):
    """No `name` and no hidden staging sibling of it (`.name.partial`) under `parent`."""
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}")]
    assert leftovers == [], leftovers
