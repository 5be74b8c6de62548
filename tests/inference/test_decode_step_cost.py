"""What a decode step costs must not depend on the context length where the attention does not need it:
a sink_window layer reads a constant number of slots, so the aten ops of a decode step of an all-sparse
model (names and every tensor shape) are the same after 40 and after 600 tokens; a full layer's ops differ
only in the cache length they read. No decode step reads a device value back to the host (a CUDA sync).

The expectations are independent of the code under test: op sequences recorded at two context lengths are
compared with each other, and the slot count of a sink_window layer is (sink + window blocks) * block."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from megatron_longgen.inference.step_plan import plan_forward
from tests.inference.reference import SPARSE, tiny_config, tiny_model

# aten ops that copy a device value to the host (`.item()`, `.tolist()`, `bool(t)`, printing ...).
_HOST_READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}


class OpRecorder(TorchDispatchMode):
    """Records (op name, shapes of every tensor argument and result) of each aten op while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_flatten((args, kwargs, out))[0]
        self.ops.append((str(func), tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))))
        return out


@torch.no_grad()
def _decode_ops(model, context: int, *, static: bool = False) -> list[tuple[str, tuple]]:
    """The aten ops of the second decode step after a prompt of `context` tokens."""
    ids = torch.randint(
        0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context)
    )
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(type(out), "cache") else out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    model(token, cache=cache, logits_to_keep=1, static_decode=static)  # the first step may grow buffers
    with OpRecorder() as recorder:
        model(token, cache=cache, logits_to_keep=1, static_decode=static)
    return recorder.ops


@pytest.fixture(scope="module")
def sparse_model():
    return tiny_model(tiny_config(layer_pattern="SSS", variant="sink_window"), seed=4)


def test_sparse_decode_step_is_independent_of_context(sparse_model):
    short, long = _decode_ops(sparse_model, 40), _decode_ops(sparse_model, 600)
    assert [name for name, _ in short] == [name for name, _ in long]
    grown = [(a, b) for a, b in zip(short, long) if a != b]
    assert not grown, f"{len(grown)} ops of a sink_window decode step grow with the context, e.g. {grown[:3]}"
    # ... and none touches more than the layer's slots: (sink + window) blocks of `block_size` tokens.
    slots = (SPARSE["num_sink_blocks"] + SPARSE["num_window_blocks"]) * SPARSE["block_size"]
    largest_cache_dim = max(
        shape[2] for _, shapes in long for shape in shapes if len(shape) == 4 and shape[1] == 2
    )  # [B, G=2, C, H] tensors: the K/V buffers and views of them
    assert largest_cache_dim == slots


def test_full_decode_step_grows_only_in_its_reads():
    model = tiny_model(tiny_config(layer_pattern="FSF", variant="sink_window"), seed=5)
    short, long = _decode_ops(model, 40), _decode_ops(model, 600)
    assert [name for name, _ in short] == [name for name, _ in long]
    for (name, a), (_, b) in zip(short, long):
        if a != b:  # only ops on a full layer's K/V buffers or its views (dim 2 = cache slots) may differ
            assert all(x == y or (len(x) == 4 and x[:2] == y[:2] and x[3] == y[3]) for x, y in zip(a, b)), (
                name
            )


def test_decode_step_never_reads_the_device(sparse_model):
    names = {name for name, _ in _decode_ops(sparse_model, 100)}
    assert not names & _HOST_READS, f"decode step syncs with the device: {sorted(names & _HOST_READS)}"


@torch.no_grad()
def test_static_decode_plan_is_independent_of_context():
    """What a CUDA graph captures besides the layers: the plan of a static decode step (slots, masks, key
    counts) is the same ops on the same shapes at any context (the full kind's key count lives on the device)."""
    model = tiny_model(tiny_config(layer_pattern="SFS", variant="sink_window"), seed=6)
    recorded = []
    for context in (40, 600):
        ids = torch.randint(
            0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1)
        )
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(type(out), "cache") else out.past_key_values
        cache.ensure_capacity(context + 8)
        with OpRecorder() as recorder:
            plan = plan_forward(
                cache, attention_mask=None, batch=1, q_len=1, device=ids.device, static_decode=True
            )
        recorded.append(recorder.ops)
        for layout, step in plan.kinds.items():
            tensors = [t for t in (step.slots_t, step.mask, step.kv_len_t) if t is not None]
            assert tensors, layout
            if layout.name == "sink_window":
                assert max(t.numel() for t in tensors) == layout.max_slots
            else:
                assert max(t.numel() for t in tensors) == 1  # [B] slots and key counts
    assert recorded[0] == recorded[1]
