"""The trainer's long-context retrieval eval (`eval.long_context_interval`) scores a sample under TP=2, CP=2
and PP=2 exactly as one process does from full [T, V] logits.

Oracle: one process, the model's own logits over the whole vocabulary and sequence, `torch.argmax`
(`evaluation.long_context.evaluate_teacher_forced`). The samples are built from the oracle's greedy answer
(so it is correct) and from that answer with one token changed (so it is not): a random tiny model would
otherwise fail every sample and the comparison would say nothing. Workers start once per module.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

LENGTH, ANSWER = 256, 4
LAYOUTS = {
    "tp2": ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true"),
    "cp2": ("parallel.context_parallel=2", "sparse.block_size=16"),
    "pp2": ("parallel.pipeline_parallel=2",),
}


def _samples(tr):
    """(samples, oracle flags) from the single-process model `tr`: greedy answers (correct) and edits."""
    from megatron_longgen.evaluation.long_context import evaluate_teacher_forced
    from megatron_longgen.evaluation.retrieval import RetrievalSample

    model = tr.model[0]
    model.eval()

    def logits(ids):
        with torch.no_grad():
            out = model(torch.tensor([ids]), torch.arange(len(ids))[None], None)
        return out[0].float()  # [T, V]

    gen = torch.Generator().manual_seed(7)
    samples = []
    for depth in (0.25, 0.75):
        prompt = torch.randint(3, 1000, (LENGTH - ANSWER,), generator=gen).tolist()
        answer = [0] * ANSWER
        for j in range(ANSWER):  # greedy decoding, one forward per token (causal: later tokens do not matter)
            answer[j] = int(logits(prompt + answer)[len(prompt) - 1 + j].argmax())
        last_wrong = answer[:-1] + [(answer[-1] + 1) % 1000]
        first_wrong = [(answer[0] + 1) % 1000] + answer[1:]
        for ans in (answer, last_wrong, first_wrong):
            samples.append(
                RetrievalSample(
                    task="passkey",
                    length=LENGTH,
                    depth=depth,
                    prompt_ids=tuple(prompt),
                    answer_ids=tuple(ans),
                    values=("x",),
                )
            )
    flags = [evaluate_teacher_forced([s], logits)["eval/passkey_acc"] == 1.0 for s in samples]
    model.train()
    return samples, flags


def _one(rank, world_size, root):
    from pathlib import Path

    from megatron_longgen.training.trainer import Trainer

    tr = Trainer(
        tiny_config("train.max_steps=1", "sparse.block_size=16"), run_dir=Path(root) / "one", quiet=True
    )
    tr.save(0)
    samples, flags = _samples(tr)
    return {"samples": samples, "flags": flags}


def _two(rank, world_size, root, samples):
    from pathlib import Path

    from megatron_longgen.training.checkpointing import load_model_weights
    from megatron_longgen.training.long_context_eval import LongContextEval
    from megatron_longgen.training.trainer import Trainer

    out = {}
    for name, overrides in LAYOUTS.items():
        cfg = tiny_config("train.max_steps=1", "sparse.block_size=16", *overrides)
        tr = Trainer(cfg, run_dir=Path(root) / name, quiet=True)
        load_model_weights(Path(root) / "one" / "checkpoints" / "step_0000000", model_chunks=tr.model)
        # One sample at a time (each verdict separately), the oracle's samples instead of cfg.eval's.
        per_sample = [LongContextEval([s]).run(tr) for s in samples]
        out[name] = {"last_stage": tr.pp_rank == tr.pp_size - 1, "metrics": per_sample}
    # Through the training loop: a run with the eval every 2 steps logs it (metrics rank) at steps 2 and 3.
    cfg = tiny_config("train.max_steps=3", "sparse.block_size=16", "parallel.tensor_parallel=2",
                      "eval.long_context_interval=2", "eval.long_context_lengths=256",
                      "eval.long_context_tasks=passkey,niah", "eval.long_context_depths=0.5")  # fmt: skip
    Trainer(cfg, run_dir=Path(root) / "loop", quiet=True).fit()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lc_eval"))
    one = run_distributed(_one, world_size=1, args=(root,), timeout_s=300)[0]
    two = run_distributed(_two, world_size=2, args=(root, one["samples"]), timeout_s=600)
    return {"root": root, "one": one, "two": two}


def test_oracle_samples_are_not_trivial(results):
    assert results["one"]["flags"] == [True, False, False] * 2


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_verdicts_equal_the_single_process(results, layout):
    flags = results["one"]["flags"]
    reporting = [r[layout] for r in results["two"] if r[layout]["last_stage"]]
    assert reporting, "no rank of the last pipeline stage reported"
    for r in reporting:
        got = [m["eval/passkey_acc"] == 1.0 for m in r["metrics"]]
        assert got == flags, (layout, got, flags)
        assert all(set(m) == {"eval/passkey_acc", f"eval/passkey_acc_{LENGTH}"} for m in r["metrics"])
    for r in results["two"]:
        if not r[layout]["last_stage"]:
            assert all(m is None for m in r[layout]["metrics"])


def test_training_loop_logs_the_eval(results):
    from pathlib import Path

    rows = [
        json.loads(line)
        for line in (Path(results["root"]) / "loop" / "metrics.jsonl").read_text().splitlines()
    ]
    evaluated = {r["step"]: r for r in rows if "eval/passkey_acc" in r}
    assert sorted(evaluated) == [2, 3]
    for row in evaluated.values():
        for key in (
            "eval/passkey_acc",
            "eval/passkey_acc_256",
            "eval/niah_single_acc",
            "eval/niah_single_acc_256",
        ):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["eval_time_s"] > 0


def test_first_argmax_across_ranks_matches_torch_argmax():
    run_distributed(_argmax_worker, world_size=2, timeout_s=120)


def _argmax_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_longgen.training.long_context_eval import first_argmax_across_ranks

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    logits[1, 2] = logits[1, 7] = 50.0  # a tie across the two halves: the lower index wins
    logits[2, 5] = logits[2, 6] = 50.0  # a tie inside the second half
    logits[3, :] = 1.0  # all equal: index 0
    got = first_argmax_across_ranks(logits[:, rank * 5 : (rank + 1) * 5], group=dist.group.WORLD,
                                    vocab_offset=rank * 5)  # fmt: skip
    assert got.tolist() == logits.argmax(dim=-1).tolist()
    assert got[1] == 2 and got[2] == 5 and got[3] == 0
