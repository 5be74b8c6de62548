"""Write a Hugging Face Llama as a GGUF file the way llama.cpp's converter does (F32 tensors, Q/K rows
permuted, byte-level BPE tokenizer as `gpt2` metadata), so prepare_model.py can be tested without the real
98 MB SmolLM2 file: a lossless F32 GGUF must come back as exactly the model it was written from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.data.byte_bpe import SPECIAL_TOKENS


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (rotary halves interleaved per head); transformers' reader undoes it."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, raw_tokenizer) -> Path:
    """Write `model` (a tied-embedding `LlamaForCausalLM`) and `raw_tokenizer` (a `tokenizers.Tokenizer`,
    byte-level BPE) as a SmolLM2-like GGUF: bos `<|im_start|>`, eos `<|im_end|>`, no `output.weight`."""
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny smollm2-like llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = raw_tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(raw_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_unk_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        writer.add_tensor(
            f"blk.{i}.attn_q.weight",
            _llama_cpp_permute(state[hf + "self_attn.q_proj.weight"], cfg.num_attention_heads),
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight",
            _llama_cpp_permute(state[hf + "self_attn.k_proj.weight"], cfg.num_key_value_heads),
        )
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", state[hf + hf_name + ".weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
