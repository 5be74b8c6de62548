"""build_datasets on indexed datasets: exact token round trip through Megatron-Core's GPTDataset and
BlendedDataset (up to 128K-token samples), blend proportions, seeding, splits, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_longgen.config import DataConfig, apply_overrides
from megatron_longgen.data.datasets import build_datasets, default_num_samples
from megatron_longgen.data.indexed import validate_indexed_prefix
from megatron_longgen.data.megatron_gpt import SAMPLE_KEYS
from megatron_longgen.data.preprocess import preprocess
from megatron_longgen.data.tokenizers import asset_path
from megatron_longgen.recipes import debug_tiny
from tests.data.conftest import make_text, write_jsonl

SEQ = 64


def _cfg(blend: str, *, seq_length: int = SEQ, seed: int = 1234, valid_fraction: float = 0.1, cache_dir=None):
    base = debug_tiny()
    return dataclasses.replace(
        base,
        train=dataclasses.replace(base.train, seq_length=seq_length, seed=seed),
        data=DataConfig(blend=blend, valid_fraction=valid_fraction, cache_dir=cache_dir),
    )


def _doc_tokens(prefix: str) -> list[np.ndarray]:
    info = validate_indexed_prefix(prefix)
    lengths = np.fromfile(prefix + ".idx", dtype=np.int32, count=info.num_sequences, offset=34)
    flat = np.fromfile(prefix + ".bin", dtype=info.dtype).astype(np.int64)
    return np.split(flat, np.cumsum(lengths)[:-1])


def _expected_gpt_sample(gpt, docs: list[np.ndarray], idx: int) -> np.ndarray:
    """The seq+1 tokens GPTDataset sample `idx` must hold, recomputed from its document/sample/shuffle
    indices and the raw documents (the packing contract: shuffled documents concatenated, then cut)."""
    order = gpt.document_index
    starts = np.concatenate([[0], np.cumsum([docs[d].size for d in order])])
    pos, offset = gpt.sample_index[gpt.shuffle_index[idx]]
    begin = int(starts[pos] + offset)
    end_pos = int(np.searchsorted(starts, begin + gpt.config.sequence_length + 1, side="left"))
    stream = np.concatenate([docs[d] for d in order[pos : end_pos + 1]])
    local = begin - int(starts[pos])
    return stream[local : local + gpt.config.sequence_length + 1]


def _assert_round_trip(samples, docs_by_prefix: dict[str, list[np.ndarray]], indices) -> None:
    from megatron.core.datasets.blended_dataset import BlendedDataset

    inner = samples.inner
    for j in indices:
        sample = samples[j]
        if isinstance(inner, BlendedDataset):
            gpt = inner.datasets[inner.dataset_index[j]]
            k = int(inner.dataset_sample_index[j])
        else:
            gpt, k = inner, j
        expected = torch.from_numpy(_expected_gpt_sample(gpt, docs_by_prefix[gpt.dataset_path], k))
        assert torch.equal(sample["tokens"], expected[:-1]), j
        assert torch.equal(sample["labels"], expected[1:]), j


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("indexed")
    rng = random.Random(1)
    out = {}
    for name, num_docs in (("a", 300), ("b", 120)):
        records = [{"text": make_text(rng, rng.randint(3, 60))} for _ in range(num_docs)]
        prefix = str(root / name)
        preprocess(
            inputs=[write_jsonl(root / f"{name}.jsonl", records)],
            tokenizer="builtin:tiny_sp",
            output_prefix=prefix,
            progress=False,
        )
        out[name] = prefix
    return out


def test_needs_a_process_group(prefixes, tokenizer):
    if dist.is_initialized():
        pytest.skip("another test left a process group")
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        build_datasets(_cfg(prefixes["a"]), tokenizer=tokenizer, num_train_samples=4)


def test_single_prefix_round_trip_and_sample_contract(gloo_group, prefixes, tokenizer, tmp_path):
    num_tokens = validate_indexed_prefix(prefixes["a"]).num_tokens
    want = 3 * num_tokens // SEQ  # more than one epoch: documents are reshuffled per epoch
    train, valid = build_datasets(
        _cfg(prefixes["a"]),
        tokenizer=tokenizer,
        num_train_samples=want,
        num_valid_samples=5,
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(train) >= want and valid is not None and len(valid) >= 5
    sample = train[0]
    assert tuple(sample) == SAMPLE_KEYS
    for key, dtype in zip(SAMPLE_KEYS, (torch.int64, torch.int64, torch.float32, torch.int64)):
        assert sample[key].dtype == dtype and sample[key].shape == (SEQ,), key
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert torch.all(sample["loss_mask"] == 1)
    _assert_round_trip(train, {prefixes["a"]: _doc_tokens(prefixes["a"])}, range(len(train)))
    _assert_round_trip(valid, {prefixes["a"]: _doc_tokens(prefixes["a"])}, range(len(valid)))
    # <bos> opens every document and appears nowhere else, so packed samples show document starts.
    docs = _doc_tokens(prefixes["a"])
    assert all(d[0] == tokenizer.bos_id and not np.any(d[1:] == tokenizer.bos_id) for d in docs)
    assert any(int((train[j]["tokens"] == tokenizer.bos_id).sum()) > 1 for j in range(len(train)))
    # Train and valid documents are disjoint.
    assert not set(train.inner.indices.tolist()) & set(valid.inner.indices.tolist())
    assert list(tmp_path.joinpath("cache").iterdir())


def test_weighted_blend_proportions_and_round_trip(gloo_group, prefixes, tokenizer, tmp_path):
    blend = f"0.7 {prefixes['a']} 0.3 {prefixes['b']}"
    train, _ = build_datasets(
        _cfg(blend, cache_dir=str(tmp_path)),
        tokenizer=tokenizer,
        num_train_samples=2000,
        num_valid_samples=10,
    )
    assert len(train) >= 2000
    share_a = float(np.mean(train.inner.dataset_index == 0))
    assert abs(share_a - 0.7) < 0.01
    docs = {p: _doc_tokens(p) for p in prefixes.values()}
    _assert_round_trip(train, docs, range(0, len(train), 7))
    assert "dataset_id" not in train[0]


def test_unweighted_blend_weights_by_tokens(gloo_group, prefixes, tokenizer, tmp_path):
    tokens = [validate_indexed_prefix(prefixes[n]).num_tokens for n in ("a", "b")]
    train, _ = build_datasets(
        _cfg(f"{prefixes['a']} {prefixes['b']}", cache_dir=str(tmp_path)),
        tokenizer=tokenizer,
        num_train_samples=1000,
        num_valid_samples=10,
    )
    assert len(train) >= 1000
    assert abs(float(np.mean(train.inner.dataset_index == 0)) - tokens[0] / sum(tokens)) < 0.01


def test_deterministic_by_seed(gloo_group, prefixes, tokenizer, tmp_path):
    def first_samples(seed: int, cache: str) -> list[torch.Tensor]:
        train, _ = build_datasets(
            _cfg(prefixes["a"], seed=seed, cache_dir=str(tmp_path / cache)),
            tokenizer=tokenizer,
            num_train_samples=50,
        )
        return [train[j]["tokens"] for j in range(20)]

    a, b, c = first_samples(7, "x"), first_samples(7, "y"), first_samples(8, "z")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))


def test_no_valid_split(gloo_group, prefixes, tokenizer, tmp_path):
    train, valid = build_datasets(
        _cfg(prefixes["a"], valid_fraction=0.0, cache_dir=str(tmp_path)),
        tokenizer=tokenizer,
        num_train_samples=10,
        num_valid_samples=10,
    )
    assert valid is None and len(train) >= 10
    blend = f"0.5 {prefixes['a']} 0.5 {prefixes['b']}"
    train, valid = build_datasets(
        _cfg(blend, cache_dir=str(tmp_path)), tokenizer=tokenizer, num_train_samples=10, num_valid_samples=0
    )
    assert valid is None and len(train) >= 10
    with pytest.raises(ValueError, match="num_valid_samples >= 0, got 10 and -1"):
        build_datasets(_cfg(blend), tokenizer=tokenizer, num_train_samples=10, num_valid_samples=-1)


def test_packs_128k_sequences(gloo_group, tokenizer, tmp_path):
    prefix = str(tmp_path / "stories")
    preprocess(
        inputs=[str(asset_path("tiny_stories.txt"))],
        tokenizer="builtin:tiny_sp",
        output_prefix=prefix,
        progress=False,
    )
    seq = 131072
    train, _ = build_datasets(
        _cfg(prefix, seq_length=seq, valid_fraction=0.0, cache_dir=str(tmp_path / "c")),
        tokenizer=tokenizer,
        num_train_samples=4,
    )
    assert len(train) >= 4
    assert train[3]["tokens"].shape == (seq,) and "attention_mask" not in train[3]
    _assert_round_trip(train, {prefix: _doc_tokens(prefix)}, range(4))


def test_corrupt_or_missing_data_is_a_clear_error(gloo_group, prefixes, tokenizer, tmp_path):
    broken = str(tmp_path / "broken")
    for ext in (".bin", ".idx"):
        shutil.copy(prefixes["a"] + ext, broken + ext)
    with open(broken + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"broken\.bin is corrupt or truncated: 100 bytes"):
        build_datasets(_cfg(broken), tokenizer=tokenizer, num_train_samples=4)
    with pytest.raises(ValueError, match=r"nothing\.idx does not exist"):
        build_datasets(_cfg(str(tmp_path / "nothing")), tokenizer=tokenizer, num_train_samples=4)
    with pytest.raises(ValueError, match=r"too few for one sample of seq_length 1000000"):
        build_datasets(_cfg(prefixes["a"], seq_length=1_000_000), tokenizer=tokenizer, num_train_samples=4)


def test_split_too_small_is_an_error_not_a_hang(gloo_group, tokenizer, tmp_path):
    # 5 documents: a 5% valid split rounds to no document, which Megatron-Core would pad with epochs for ever.
    prefix = str(tmp_path / "few")
    records = [{"text": make_text(random.Random(i), 60)} for i in range(5)]
    preprocess(
        inputs=[write_jsonl(tmp_path / "few.jsonl", records)],
        tokenizer="builtin:tiny_sp",
        output_prefix=prefix,
        progress=False,
    )
    with pytest.raises(
        ValueError, match=r"the valid split of .*few \(documents 5\.\.5 of 5\) holds 0 tokens"
    ):
        build_datasets(_cfg(prefix, valid_fraction=0.05), tokenizer=tokenizer, num_train_samples=4)


def test_tokenizer_mismatch_is_an_error(gloo_group, prefixes, tokenizer, tmp_path):
    other = str(tmp_path / "other")
    for ext in (".bin", ".idx", ".stats.json"):
        shutil.copy(prefixes["a"] + ext, other + ext)
    stats = json.loads(Path(other + ".stats.json").read_text())
    stats["vocab_size"] = 32000
    Path(other + ".stats.json").write_text(json.dumps(stats))
    with pytest.raises(
        ValueError,
        match=r"vocab_size 32000, bos 1\), but the run's tokenizer 'builtin:tiny_sp' has vocab_size 1024",
    ):
        build_datasets(_cfg(other), tokenizer=tokenizer, num_train_samples=4)


@pytest.mark.parametrize(
    "blend, match",
    [
        ("0.5 a 0.5", "has 3 items"),
        ("0.5 a b 0.5", "expected WEIGHT PREFIX at items 2 and 3"),
        ("0 a 1 b", "weight of 'a' must be > 0, got 0.0"),
        ("0.5 a 0.5 1", "expected WEIGHT PREFIX at items 2 and 3"),
    ],
)
def test_blend_validation(blend, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(blend=blend)


def test_blend_override():
    cfg = apply_overrides(debug_tiny(), ["data.blend=0.6 /d/a 0.4 /d/b", "data.cache_dir=/tmp/c"])
    assert cfg.data.blend == "0.6 /d/a 0.4 /d/b" and cfg.data.cache_dir == "/tmp/c"
    with pytest.raises(ValueError, match="cache_dir must be None or a non-empty path"):
        DataConfig(cache_dir=" ")


def test_default_sample_counts_do_not_depend_on_the_step_budget(prefixes):
    blend = f"0.6 {prefixes['a']} 0.4 {prefixes['b']}"
    cfg = _cfg(blend)
    tokens = (
        validate_indexed_prefix(prefixes["a"]).num_tokens + validate_indexed_prefix(prefixes["b"]).num_tokens
    )
    t = cfg.train
    expected = (int(tokens * 0.9) // SEQ, t.eval_iters * t.global_batch_size)
    assert default_num_samples(cfg) == expected
    for max_steps, eval_interval in ((7, 0), (500, 10)):
        other = dataclasses.replace(
            cfg, train=dataclasses.replace(t, max_steps=max_steps, eval_interval=eval_interval)
        )
        assert default_num_samples(other) == expected


def test_resuming_with_a_larger_step_budget_reads_the_same_samples(prefixes, tmp_path):
    """The samples of the first steps are the same whatever `train.max_steps` is (a run resumed with more
    steps continues the data order of the original run): datasets built for 5 and for 400 steps, read
    through the trainer's sample order."""
    from megatron_longgen.data.tokenizers import load_tokenizer
    from megatron_longgen.training.data_order import SampleOrder, micro_batches

    blend = f"0.6 {prefixes['a']} 0.4 {prefixes['b']}"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        seen = []
        for max_steps in (5, 400):
            cfg = _cfg(blend, cache_dir=str(tmp_path / f"cache{max_steps}"))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
            train, _ = build_datasets(cfg, tokenizer=load_tokenizer("builtin:tiny_sp"))
            order = SampleOrder(len(train), seed=cfg.train.seed)
            seen.append(
                [
                    batch["tokens"].tolist()
                    for step in range(5)
                    for batch in micro_batches(
                        train, order, step=step, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1
                    )
                ]
            )
    finally:
        if created:
            dist.destroy_process_group()
    assert seen[0] == seen[1]


def test_text_corpus_path_still_works(tmp_path, tokenizer):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(make_text(random.Random(i), 40) for i in range(30)), encoding="utf-8")
    cfg = dataclasses.replace(_cfg(""), data=DataConfig(corpus=str(corpus), valid_fraction=0.1))
    train, _ = build_datasets(cfg, tokenizer=tokenizer)
    assert tuple(train[0]) == SAMPLE_KEYS and train[0]["tokens"].shape == (SEQ,)


def _two_rank_worker(rank, world_size, blend, cache_dir):
    from megatron_longgen.data.tokenizers import load_tokenizer

    train, valid = build_datasets(
        _cfg(blend, cache_dir=cache_dir),
        tokenizer=load_tokenizer("builtin:tiny_sp"),
        num_train_samples=200,
        num_valid_samples=8,
    )
    return [train[j]["tokens"].tolist() for j in range(0, 200, 10)], len(valid)


@pytest.mark.slow
def test_two_ranks_share_the_cache_and_see_the_same_samples(prefixes, tokenizer, tmp_path):
    from tests.helpers.distributed import run_distributed

    blend = f"0.5 {prefixes['a']} 0.5 {prefixes['b']}"
    results = run_distributed(
        _two_rank_worker, world_size=2, args=(blend, str(tmp_path / "shared")), timeout_s=240
    )
    assert results[0] == results[1]
    assert results[0][1] >= 8
    # The samples do not depend on the process that built the index caches.
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        local, _ = build_datasets(
            _cfg(blend, cache_dir=str(tmp_path / "local")),
            tokenizer=tokenizer,
            num_train_samples=200,
            num_valid_samples=8,
        )
    finally:
        if created:
            dist.destroy_process_group()
    assert results[0][0] == [local[j]["tokens"].tolist() for j in range(0, 200, 10)]
