"""The metrics loggers: console line, JSON lines (fresh vs resumed), W&B offline, fan-out, metrics rank."""

import json

from megatron_longgen.training.loggers import (
    ConsoleLogger,
    JsonlLogger,
    LoggerGroup,
    MetricsLogger,
    WandbLogger,
    is_metrics_rank,
    metrics_rank,
)


def test_console_line():
    lines = []
    ConsoleLogger(max_steps=200, print_fn=lambda text, flush: lines.append(text)).log(
        {
            "loss": 5.12345,
            "lr": 3e-4,
            "grad_norm": 0.5,
            "tokens_per_s": 1234.4,
            "step_time_s": 0.52,
            "eta_s": 98.0,
        },
        12,
    )
    assert lines == [
        "step    12/200 | loss 5.1235 | lr 3.00e-04 | grad 0.500 | 1234 tok/s | 0.52 s/step | ETA 01:38"
    ]


def test_jsonl_fresh_then_resumed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = JsonlLogger(path)
    first.log({"loss": 2.0}, 1)
    first.close()
    resumed = JsonlLogger(path, append=True)
    resumed.log({"loss": 1.5}, 2)
    resumed.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
    ]
    JsonlLogger(path).close()  # a fresh run starts a fresh file
    assert path.read_text() == ""


def test_wandb_offline_and_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    group = LoggerGroup(
        [MetricsLogger(), jsonl, WandbLogger(project="p", name="n", config={"a": 1}, run_dir=tmp_path)]
    )
    for step in (1, 2):
        group.log({"loss": 1.0 / step}, step)
    group.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_rank_is_first_rank_of_last_stage():
    assert metrics_rank(pp_size=4, world_size=16) == 12
    assert metrics_rank(pp_size=1, world_size=8) == 0
    assert is_metrics_rank(pp_rank=3, pp_size=4, tp_rank=0, dp_rank=0, cp_rank=0)
    assert not is_metrics_rank(pp_rank=3, pp_size=4, tp_rank=1, dp_rank=0, cp_rank=0)
    assert not is_metrics_rank(pp_rank=0, pp_size=4, tp_rank=0, dp_rank=0, cp_rank=0)


def test_wandb_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = WandbLogger(project="p", name="n", config={}, run_dir=tmp_path)
    first.log({"loss": 2.0}, 1)
    first.close()
    resumed = WandbLogger(project="p", name="n", config={}, run_dir=tmp_path, resume_run=True)
    resumed.log({"loss": 1.0}, 2)
    resumed.close()
    assert resumed.run_id == first.run_id
    fresh = WandbLogger(project="p", name="n", config={}, run_dir=tmp_path)
    fresh.close()
    assert fresh.run_id != first.run_id
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert sum(first.run_id in r.name for r in runs) == 2  # both parts of the resumed run carry its id
