"""Helpers for the command-line tests: run a tool as a user would (a subprocess, from the repo root), and
a tiny HF Llama whose vocabulary matches the shipped SentencePiece tokenizer (so its export carries it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_tool(
    script: str, *args: str, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python tools/SCRIPT ARGS...` with this checkout importable; returns the finished process."""
    environ = {k: v for k, v in os.environ.items() if k != "LONGGEN_DEBUG"}
    environ.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=environ,
        check=False,
    )


def dead_pid() -> int:
    """The pid of a process that has just exited (what a SIGKILLed run leaves in its temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A random 2-layer HF Llama with the 1,024-token vocabulary of `builtin:tiny_sp`."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    folder = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_mcore(tiny_hf, tmp_path_factory) -> Path:
    """`tiny_hf` converted (in a subprocess, so this process starts no process group)."""
    out = tmp_path_factory.mktemp("tiny_mcore") / "ckpt"
    result = run_tool("convert_hf_to_mcore.py", "--hf-dir", str(tiny_hf), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out
