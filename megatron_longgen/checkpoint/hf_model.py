"""A transformers-compatible LongGen Llama: HF's Llama weights and module names, LongGen's per-layer attention
and a reduced KV cache.

Legend: B = batch rows, T = tokens of a forward, D = hidden size.

How HF users load an exported folder (no network, no `trust_remote_code`)::

    from megatron_longgen.checkpoint.hf_model import LongGenLlamaForCausalLM
    model = LongGenLlamaForCausalLM.from_pretrained("llama2-7b-longgen-hf")  # tools/convert_mcore_to_hf.py
    out = model.generate(input_ids, max_new_tokens=64)                      # reduced KV cache

or, after `register_auto_classes()`, through `AutoModelForCausalLM.from_pretrained(...)`.

Design:
- The exported `config.json` has `model_type: longgen_llama` (so plain `LlamaForCausalLM` is not picked by
  accident and silently run dense) and a `longgen` section: `layer_pattern` (`S`/`F` per layer, bottom
  first) and the `SparseAttentionConfig` fields. A plain Llama folder (no section) loads as all-`F`.
- Each layer's `self_attn` is `inference.attention.LongGenAttention`: prefill through the project's sparse
  kernels (S layers) and causal SDPA (F layers), never an [T, T] mask; decode over
  `inference.LongGenCache`, which keeps per layer exactly the keys the training mask lets a future query
  see. `generate()` gets that cache automatically (`_prepare_cache_for_generation`), sized for prompt +
  `max_new_tokens`; so do plain forwards with `use_cache=True`.
- The KV policy (`set_kv_policy`) decides each layer's pattern: `model` (the trained layout), `full`
  (every layer dense), or `sink_window` / `block_strided` applied to every layer — on an all-F model the
  former is the paper's inference-only AttnSink baseline.
- Positions are document positions (RoPE and the masks): the first real token of each row is 0. Pad on
  the left for batched generation (transformers' convention); right padding is exact too (scoring). Each
  row's real tokens must be one contiguous span (see `inference/step_plan.py`).
- Decode on CUDA can replay one captured graph per step (`model.use_cuda_graphs = True`; full layers
  then attend through the split-KV Triton kernel): far fewer kernel launches at batch 1.
- Long prompts: the MLP runs in chunks of `MLP_CHUNK` tokens; logits are computed only for
  `logits_to_keep` positions (generate() asks for 1).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from megatron_longgen.attention.masks import SparsePattern, pattern_from_config
from megatron_longgen.config import SparseAttentionConfig
from megatron_longgen.inference.attention import LongGenAttention
from megatron_longgen.inference.cuda_graphs import CudaGraphDecoder
from megatron_longgen.inference.kv_cache import LongGenCache
from megatron_longgen.inference.kv_layout import KV_POLICIES, KVLayout, layout_for
from megatron_longgen.inference.step_plan import finish_forward, plan_forward

MLP_CHUNK = 16384  # tokens per MLP call on long prompts (bounds the [T, ffn] intermediates)
# transformers >= 5.20 names the outputs' cache field `cache` (older: `past_key_values`, now a warning alias).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_GENERATE_CACHE_KEY = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)  # fmt: skip


class LongGenLlamaConfig(LlamaConfig):
    """LlamaConfig plus the `longgen` section (dict) written by `convert.longgen_to_hf_config`."""

    model_type = "longgen_llama"


def _sparse_section(config: LlamaConfig) -> dict | None:
    section = getattr(config, "longgen", None)
    if section is None:
        return None
    if not isinstance(section, dict) or "layer_pattern" not in section:
        raise ValueError(
            "config.longgen must be a dict with a layer_pattern (written by convert_mcore_to_hf)"
        )
    return section


def layer_patterns(config: LlamaConfig) -> list[SparsePattern | None]:
    """Per layer: the sparse pattern of an `S` layer, None for an `F` layer (all None without a `longgen`
    section: a plain Llama). Raises ValueError for an inconsistent section."""
    section = _sparse_section(config)
    if section is None:
        return [None] * config.num_hidden_layers
    layout = section["layer_pattern"]
    if len(layout) != config.num_hidden_layers:
        raise ValueError(
            f"longgen.layer_pattern has {len(layout)} characters but num_hidden_layers is "
            f"{config.num_hidden_layers}"
        )
    sparse = SparseAttentionConfig(**{k: v for k, v in section.items() if k != "layer_pattern"})
    pattern = pattern_from_config(sparse)
    return [pattern if kind == "S" else None for kind in layout]


def policy_patterns(config: LlamaConfig, policy: str, **overrides) -> list[SparsePattern | None]:
    """Per-layer patterns of a KV policy (`KV_POLICIES`). `overrides` are `SparseAttentionConfig` fields
    (block_size, num_sink_blocks, num_window_blocks, stride_blocks, num_local_blocks); the defaults are
    the model's own sparse settings, else LongGen's (64-token blocks, 1 sink, 32 window, stride 64)."""
    if policy not in KV_POLICIES:
        raise ValueError(f"unknown KV policy {policy!r}; choose from {KV_POLICIES}")
    if policy == "model":
        if overrides:
            raise ValueError(f"KV policy 'model' takes no overrides, got {sorted(overrides)}")
        return layer_patterns(config)
    if policy == "full":
        return [None] * config.num_hidden_layers
    section = dict(_sparse_section(config) or {})
    section.pop("layer_pattern", None)
    section.update(overrides, variant=policy)
    return [pattern_from_config(SparseAttentionConfig(**section))] * config.num_hidden_layers


def _mlp(layer: LlamaDecoderLayer, hidden_BTD: torch.Tensor) -> torch.Tensor:
    """post-attention norm + MLP, in chunks of MLP_CHUNK tokens when no gradient is needed."""
    tokens = hidden_BTD.shape[1]
    if tokens <= MLP_CHUNK or torch.is_grad_enabled():
        return layer.mlp(layer.post_attention_layernorm(hidden_BTD))
    out = torch.empty_like(hidden_BTD)
    for start in range(0, tokens, MLP_CHUNK):
        part = hidden_BTD[:, start : start + MLP_CHUNK]
        out[:, start : start + MLP_CHUNK] = layer.mlp(layer.post_attention_layernorm(part))
    return out


def _resolve_cache(cache, past_key_values):
    cache = cache if cache is not None else past_key_values
    if cache is None or isinstance(cache, LongGenCache):
        return cache
    if isinstance(cache, Cache) and cache.get_seq_length() == 0:
        return None  # an empty default cache (e.g. a DynamicCache from generic code): use ours instead
    raise TypeError(
        f"LongGenLlamaForCausalLM needs a LongGenCache, got a filled {type(cache).__name__}; "
        "let the model create it (use_cache=True) or pass model.new_cache()"
    )


class LongGenLlamaModel(LlamaModel):
    """LlamaModel whose layers run LongGen's attention over a `LongGenCache` (see the module docstring)."""

    def __init__(self, config: LlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers = []
        for index in range(config.num_hidden_layers):
            layer = LlamaDecoderLayer(config, index)
            layer.self_attn = LongGenAttention(config, index)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.sparse_backend = "auto"
        self._kernels: dict = {}
        self.set_patterns(layer_patterns(config))
        self.post_init()

    def set_patterns(self, patterns: list[SparsePattern | None]) -> None:
        if len(patterns) != len(self.layers):
            raise ValueError(f"{len(patterns)} patterns for {len(self.layers)} layers")
        for layer, pattern in zip(self.layers, patterns):
            layer.self_attn.longgen_pattern = pattern

    def kv_layouts(self) -> list[KVLayout]:
        return [layout_for(layer.self_attn.longgen_pattern) for layer in self.layers]

    def sparse_kernel(
        self, pattern: SparsePattern, *, device: torch.device, dtype: torch.dtype, head_dim: int
    ):
        """The whole-sequence sparse kernel for prefill of `pattern` (resolved once per inputs, logged once)."""
        key = (self.sparse_backend, device, dtype, pattern, head_dim)
        if key not in self._kernels:
            from megatron_longgen.attention.backends import resolve_backend
            from megatron_longgen.attention.kernels import available_kernels

            resolved = resolve_backend(
                kind="sparse", requested=self.sparse_backend, device=device, dtype=dtype, pattern=pattern,
                head_dim=head_dim,
            )  # fmt: skip
            self._kernels[key] = available_kernels()[resolved.name]()
        return self._kernels[key]

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Cache | None = None,
        static_decode: bool = False,
        **unused,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise NotImplementedError("LongGen attention does not materialise attention weights")
        cache = _resolve_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, tokens = inputs_embeds.shape[:2]
        if cache is None and use_cache:
            cache = LongGenCache(layouts=self.kv_layouts())
        plan = plan_forward(
            cache,
            attention_mask=attention_mask,
            batch=batch,
            q_len=tokens,
            device=inputs_embeds.device,
            static_decode=static_decode,
        )
        if position_ids is None:
            position_ids = plan.positions.clamp(min=0)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        kernels = {}  # prefill: one sparse kernel per distinct pattern
        if plan.mode == "prefill":
            head_dim = self.layers[0].self_attn.head_dim
            for pattern in {layer.self_attn.longgen_pattern for layer in self.layers} - {None}:
                kernels[pattern] = self.sparse_kernel(
                    pattern, device=inputs_embeds.device, dtype=inputs_embeds.dtype, head_dim=head_dim
                )
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            kernel = kernels.get(layer.self_attn.longgen_pattern)
            hidden = hidden + layer.self_attn(
                layer.input_layernorm(hidden), position_embeddings, plan=plan, cache=cache, kernel=kernel
            )
            hidden = hidden + _mlp(layer, hidden)
            if all_hidden is not None:
                all_hidden.append(hidden)
        finish_forward(cache, plan)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden[-1] = hidden
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{_CACHE_FIELD: cache if use_cache else None},
        )


class LongGenLlamaForCausalLM(LlamaForCausalLM):
    """HF Llama with LongGen's per-layer attention and reduced KV cache (see the module docstring)."""

    config_class = LongGenLlamaConfig

    def __init__(self, config: LlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LongGenLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.use_cuda_graphs = False
        """Decode steps on CUDA replay a captured graph (`inference/cuda_graphs.py`); off by default."""
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(*args, **kwargs)

    # ----- LongGen specifics --------------------------------------------------------------------------
    def set_kv_policy(self, policy: str = "model", **overrides) -> None:
        """Choose every layer's attention pattern (and so its cache): see `policy_patterns`."""
        self.model.set_patterns(policy_patterns(self.config, policy, **overrides))

    def layer_kinds(self) -> str:
        """One character per layer: `F` full, `S` sparse (under the current KV policy)."""
        return "".join("F" if layer.self_attn.longgen_pattern is None else "S" for layer in self.model.layers)

    def new_cache(self, *, max_cache_len: int | None = None) -> LongGenCache:
        """An empty reduced cache for this model's current KV policy."""
        return LongGenCache(layouts=self.model.kv_layouts(), max_cache_len=max_cache_len)

    @property
    def sparse_backend(self) -> str:
        return self.model.sparse_backend

    @sparse_backend.setter
    def sparse_backend(self, name: str) -> None:
        """Sparse kernel for prefill: `auto` (default), `torch`, `triton`, `cudnn_bsa`, `flex`, ..."""
        self.model.sparse_backend = name

    def _graphed_decode(self, input_ids, cache) -> torch.Tensor | None:
        """Logits [B, 1, V] of a decode step replayed from the cache's CUDA graph, when enabled and possible."""
        if not (self.use_cuda_graphs and isinstance(cache, LongGenCache) and not cache.is_empty):
            return None
        if input_ids is None or input_ids.shape[1] != 1 or not input_ids.is_cuda or self.training:
            return None
        if cache.graph_decoder is None:
            cache.graph_decoder = CudaGraphDecoder(self, cache)
        return cache.graph_decoder(input_ids)[:, None].clone()

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        """generate(): our reduced cache, sized for prompt + max_new_tokens, unless the caller passed one."""
        user_cache = model_kwargs.get(_GENERATE_CACHE_KEY)
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        if user_cache is not None or generation_config.use_cache is False:
            return
        current = model_kwargs.get(_GENERATE_CACHE_KEY)
        if current is None or isinstance(current, DynamicCache):  # transformers' default: use ours instead
            model_kwargs[_GENERATE_CACHE_KEY] = self.new_cache(max_cache_len=max_cache_length)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        static_decode: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if not static_decode and labels is None and not output_hidden_states:
            graphed = self._graphed_decode(input_ids, cache or past_key_values)
            if graphed is not None:
                result = CausalLMOutputWithPast(logits=graphed, **{_CACHE_FIELD: cache or past_key_values})
                return result if return_dict is not False else result.to_tuple()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            static_decode=static_decode,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return result if return_dict is not False else result.to_tuple()


def register_auto_classes() -> None:
    """Register `longgen_llama` with AutoConfig / AutoModelForCausalLM (for code that uses the Auto API)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.suppress(ValueError):  # already registered in this process
        AutoConfig.register(LongGenLlamaConfig.model_type, LongGenLlamaConfig)
    with contextlib.suppress(ValueError):
        AutoModelForCausalLM.register(LongGenLlamaConfig, LongGenLlamaForCausalLM)
