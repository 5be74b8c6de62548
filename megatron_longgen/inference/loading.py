"""Load an exported model folder (and its tokenizer) for inference, with a KV policy; shared CLI options.

A folder written by `tools/convert_mcore_to_hf.py` (`model_type: longgen_llama`) runs its trained layout;
a plain HF Llama folder runs all-`F`. `--kv-policy` then picks each layer's attention and cache:
`model` (as trained), `full`, or `sink_window` / `block_strided` on every layer (on an all-F model,
`sink_window` is the paper's inference-only AttnSink baseline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_longgen.inference.kv_layout import KV_POLICIES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_POLICY_FIELDS = {
    "kv_block_size": "block_size",
    "kv_sink_blocks": "num_sink_blocks",
    "kv_window_blocks": "num_window_blocks",
    "kv_stride_blocks": "stride_blocks",
    "kv_local_blocks": "num_local_blocks",
}


def load_model(
    model_dir: str | Path,
    *,
    kv_policy: str = "model",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    sparse_backend: str = "auto",
    **policy_overrides: int,
):
    """`LongGenLlamaForCausalLM` from `model_dir` in eval mode. `dtype` None keeps the stored dtype;
    `policy_overrides` are sparse fields for the `sink_window` / `block_strided` policies."""
    from megatron_longgen.checkpoint.hf_model import LongGenLlamaForCausalLM

    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in ("longgen_llama", "llama"):
        raise ValueError(f"{model_dir} holds a {model_type!r} model; expected longgen_llama or llama")
    model = LongGenLlamaForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype if dtype is not None else "auto"
    )
    model.set_kv_policy(kv_policy, **policy_overrides)
    model.sparse_backend = sparse_backend
    return model.to(device).eval()


def load_tokenizer_for(model_dir: str | Path, tokenizer: str | None = None):
    """`tokenizer` if given (SentencePiece .model, HF tokenizer folder, `builtin:tiny_sp`), else the
    tokenizer files in `model_dir` (an HF tokenizer, or a SentencePiece `tokenizer.model`)."""
    from megatron_longgen.data.tokenizers import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    folder = Path(model_dir)
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return load_tokenizer(str(folder))
    if (folder / "tokenizer.model").exists():
        return load_tokenizer(str(folder / "tokenizer.model"))
    raise ValueError(
        f"{model_dir} has no tokenizer files; pass --tokenizer (a SentencePiece .model file, a Hugging Face "
        "tokenizer folder, or builtin:tiny_sp for the tiny demo model)"
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --tokenizer, --kv-policy (+ its sparse fields), --device, --dtype, --sparse-backend."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, help="exported HF folder (tools/convert_mcore_to_hf.py)")
    group.add_argument(
        "--tokenizer", default=None, help="tokenizer if the folder has none (.model, HF folder)"
    )
    group.add_argument(
        "--kv-policy", default="model", choices=KV_POLICIES, help="each layer's attention + cache"
    )
    for flag, field in _POLICY_FIELDS.items():
        group.add_argument(
            "--" + flag.replace("_", "-"), type=int, default=None, help=f"{field} for a sparse --kv-policy"
        )
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: as stored")
    group.add_argument(
        "--sparse-backend", default="auto", help="sparse prefill kernel (auto, torch, triton, ...)"
    )


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from `add_model_args` options; ValueError when the tokenizer does not fit."""
    overrides = {
        field: getattr(args, flag)
        for flag, field in _POLICY_FIELDS.items()
        if getattr(args, flag) is not None
    }
    if overrides and args.kv_policy in ("model", "full"):
        raise ValueError(
            f"--kv-* sizes apply to --kv-policy sink_window / block_strided, not {args.kv_policy!r}"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(
        args.model,
        kv_policy=args.kv_policy,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=device,
        sparse_backend=args.sparse_backend,
        **overrides,
    )
    tokenizer = load_tokenizer_for(args.model, args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {model.config.vocab_size}: "
            "wrong --tokenizer?"
        )
    return model, tokenizer
