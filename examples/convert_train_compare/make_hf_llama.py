"""Write a small random Hugging Face Llama (the shape of the `debug_tiny` recipe) to stand in for a
downloaded checkpoint such as Llama-2-7b-hf: 6 layers, width 128, 4 query / 2 KV heads, SwiGLU 352, and the
1,024-token vocabulary of the shipped tokenizer (`builtin:tiny_sp`), so the converted weights load into the
recipe with `--init-checkpoint`.

    python examples/convert_train_compare/make_hf_llama.py --out work/hf_llama
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype=torch.float32,
    )
    LlamaForCausalLM(config).save_pretrained(args.out)
    print(
        f"wrote a random {sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6:.2f}M-parameter "
        f"Llama to {args.out}"
    )


if __name__ == "__main__":
    main()
