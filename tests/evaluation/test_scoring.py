"""Teacher-forced scoring == what greedy decoding does; accuracy tables; the trainer's eval set."""

import dataclasses

import pytest
import torch

from megatron_longgen.config import (
    EvalConfig,
    LongGenConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from megatron_longgen.evaluation.long_context import build_long_context_samples, evaluate_teacher_forced
from megatron_longgen.evaluation.retrieval import build_sample
from megatron_longgen.evaluation.scoring import (
    accuracy_table,
    answer_argmax,
    generation_score,
    metrics_for_logging,
    teacher_forced_correct,
)
from megatron_longgen.recipes import debug_tiny
from tests.inference.reference import tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(layer_pattern="SFS", vocab=1024), seed=4)


@torch.no_grad()
def _greedy(model, prompt, n):
    ids = torch.tensor([list(prompt)])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("task", ["passkey", "niah_single"])
@torch.no_grad()
def test_teacher_forcing_decides_greedy_decoding(model, sp_tokenizer, task):
    """On a real (random) model: an answer equal to what greedy decoding produces is scored correct from
    one forward, and an answer that differs in its second token is scored wrong (greedy disagrees too)."""
    sample = build_sample(sp_tokenizer, task=task, length=400, depth=0.5, seed=2)
    n = len(sample.answer_ids)
    produced = _greedy(model, sample.prompt_ids, n)
    as_generated = dataclasses.replace(sample, answer_ids=tuple(produced))
    logits = model(torch.tensor([as_generated.input_ids]), use_cache=False).logits[0]
    assert teacher_forced_correct(as_generated, answer_argmax(as_generated, logits))
    wrong = list(produced)
    wrong[1] = (wrong[1] + 1) % 1024
    as_wrong = dataclasses.replace(sample, answer_ids=tuple(wrong))
    logits = model(torch.tensor([as_wrong.input_ids]), use_cache=False).logits[0]
    assert not teacher_forced_correct(as_wrong, answer_argmax(as_wrong, logits))
    assert _greedy(model, sample.prompt_ids, n) != wrong


def test_accuracy_table_and_metric_names(sp_tokenizer):
    samples = [
        build_sample(sp_tokenizer, task="passkey", length=n, depth=d, seed=0)
        for n in (512, 640)
        for d in (0.0, 1.0)
    ]
    table = accuracy_table(samples, [1.0, 0.0, 1.0, 1.0])["passkey"]
    assert table["by_length_depth"] == {512: {0.0: 1.0, 1.0: 0.0}, 640: {0.0: 1.0, 1.0: 1.0}}
    assert table["by_length"] == {512: 0.5, 640: 1.0} and table["mean"] == 0.75
    metrics = metrics_for_logging({"passkey": table})
    assert metrics == {"eval/passkey_acc": 0.75, "eval/passkey_acc_512": 0.5, "eval/passkey_acc_640": 1.0}


def test_generation_score_counts_values(sp_tokenizer):
    s = build_sample(sp_tokenizer, task="niah_multivalue", length=1200, depth=0.2, seed=1)
    assert generation_score(s, " " + ", ".join(s.values)) == 1.0
    assert generation_score(s, f" {s.values[1]} and {s.values[3]}") == 0.5
    with pytest.raises(ValueError, match="argmax"):
        teacher_forced_correct(s, [1, 2])


def test_eval_config_overrides_and_round_trip():
    cfg = apply_overrides(
        debug_tiny(),
        ["eval.long_context_interval=50", "eval.long_context_lengths=512,1024", "eval.long_context_tasks=passkey,niah",
         "eval.long_context_depths=0,0.5,1"],
    )  # fmt: skip
    assert cfg.eval.long_context_lengths == (512, 1024) and cfg.eval.long_context_tasks == ("passkey", "niah")
    assert cfg.eval.long_context_depths == (0.0, 0.5, 1.0) and cfg.eval.long_context_interval == 50
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and isinstance(again, LongGenConfig)
    for bad, match in [("long_context_tasks=pass", "long_context_tasks"), ("long_context_depths=2", "depths"),
                       ("long_context_lengths=abc", "comma-separated"), ("long_context_interval=-1", "interval")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            apply_overrides(debug_tiny(), ["eval." + bad])
    assert EvalConfig().long_context_interval == 0


@torch.no_grad()
def test_trainer_eval_set_and_driver(model, sp_tokenizer):
    cfg = EvalConfig(
        long_context_interval=10, long_context_tasks=("passkey", "niah"), long_context_depths=(0.0, 1.0)
    )
    samples = build_long_context_samples(cfg, sp_tokenizer, seq_length=512)
    assert [len(s.input_ids) for s in samples] == [512] * 4
    assert [s.task for s in samples] == ["passkey", "passkey", "niah_single", "niah_single"]
    metrics = evaluate_teacher_forced(
        samples, lambda ids: model(torch.tensor([ids]), use_cache=False).logits[0]
    )
    assert set(metrics) == {
        "eval/passkey_acc",
        "eval/passkey_acc_512",
        "eval/niah_single_acc",
        "eval/niah_single_acc_512",
    }
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
