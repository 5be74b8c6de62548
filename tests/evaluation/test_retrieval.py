"""Passkey / NIAH samples: exact lengths, needle depth and boundaries, answer spans, formats kept apart
from the training data."""

import re

import pytest

from megatron_longgen.data.tokenizers import asset_path
from megatron_longgen.evaluation.haystack import haystack_documents, haystack_text
from megatron_longgen.evaluation.retrieval import TASKS, build_sample, build_samples


@pytest.mark.parametrize("task", TASKS)
def test_exact_length_and_answer(tokenizer, task):
    for length in (700, 1500):
        for depth in (0.0, 0.3, 1.0):
            s = build_sample(tokenizer, task=task, length=length, depth=depth, seed=5)
            assert len(s.input_ids) == length and s.prompt_ids[0] == tokenizer.bos_id
            answer = tokenizer.decode(list(s.answer_ids)).strip()
            if task == "niah_multivalue":
                assert answer.split(", ") == list(s.values) and len(s.values) == 4
            else:
                assert answer == s.values[0]
                assert re.fullmatch(r"\d{5}" if task == "passkey" else r"\d{7}", answer)
            positions = s.answer_logit_positions
            assert s.input_ids[positions.start + 1 : positions.stop + 1] == list(s.answer_ids)


def _needle_char_offset(tokenizer, sample, value):
    text = tokenizer.decode(list(sample.prompt_ids))
    return text.index(value) / len(text)


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
def test_needle_moves_with_depth(tokenizer, task):
    offsets = []
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = build_sample(tokenizer, task=task, length=3000, depth=depth, seed=1)
        where = _needle_char_offset(tokenizer, s, s.values[0])
        offsets.append(where)
        assert abs(where - depth) < 0.12, f"depth {depth}: needle at {where:.2f} of the prompt"
    assert offsets == sorted(offsets)


def test_niah_needle_sits_at_a_sentence_boundary(tokenizer):
    for seed in range(4):
        s = build_sample(tokenizer, task="niah_single", length=2000, depth=0.5, seed=seed)
        text = tokenizer.decode(list(s.prompt_ids))
        before = text[: text.index("One of the special magic numbers")].rstrip()
        assert before.endswith((".", "?", "!")), before[-80:]


def test_multikey_asks_one_key_among_distractors(sp_tokenizer):
    s = build_sample(sp_tokenizer, task="niah_multikey", length=2500, depth=0.4, seed=3, num_needles=3)
    text = sp_tokenizer.decode(list(s.prompt_ids))
    keys = re.findall(r"magic numbers for (\w+-\w+) is", text)
    asked = re.findall(r"special magic number for (\w+-\w+) mentioned", text)
    assert len(set(keys)) == 3 and asked[0] in keys and len(s.values) == 1


def test_samples_are_reproducible_and_vary(sp_tokenizer):
    a = build_samples(sp_tokenizer, task="passkey", lengths=[600], depths=[0.5], num_samples=3, seed=9)
    b = build_samples(sp_tokenizer, task="passkey", lengths=[600], depths=[0.5], num_samples=3, seed=9)
    assert a == b and len({s.values for s in a}) == 3


def test_errors_name_the_numbers(sp_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        build_sample(sp_tokenizer, task="niah_multikey", length=100, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        build_sample(sp_tokenizer, task="passkey", length=600, depth=1.5, seed=0)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        build_sample(sp_tokenizer, task="needle", length=600, depth=0.5, seed=0)


def test_haystack_is_prose_and_not_training_text():
    text = haystack_text()
    assert 900_000 < len(text) < 1_500_000 and text.isascii()
    assert asset_path("haystack_gnu_manuals.txt.xz").stat().st_size < 1_000_000
    # No licence text (the SmolLM2 example trains on licence texts) and no eval phrasing.
    for phrase in ("General Public License", "Permission is granted", "WITHOUT ANY WARRANTY", "pass key",
                   "special magic number"):  # fmt: skip
        assert phrase.lower() not in text.lower()
    stories = asset_path("tiny_stories.txt").read_text()
    paragraphs = text.split("\n\n")
    assert not any(p[:120] in stories for p in paragraphs[::50])
    assert "pass key" not in stories and "magic number" not in stories
    assert len(haystack_documents(min_chars=100_000)) >= 9
