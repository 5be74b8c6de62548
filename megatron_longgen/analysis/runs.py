"""Read a training run's logged metrics from its run dir (`metrics.jsonl` + `config.json`) or from a W&B
offline run folder (`wandb/offline-run-*/run-*.wandb`), into one `RunRecord`.

A W&B `.wandb` file is a LevelDB-format log (https://github.com/google/leveldb/blob/main/doc/log_format.md):
a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB blocks of records, each
`checksum u32 | length u16 | type u8 | data`, a logical record being one FULL piece or FIRST, MIDDLE...,
LAST pieces; each logical record is a protobuf `wandb_internal_pb2.Record`. Only `history` (the rows
`run.log` wrote) and `config` records are read. wandb >= 0.20 has no Python reader of its own, hence this.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class RunRecord:
    """One run: its name, config (possibly partial) and logged rows (dicts with `step`), sorted by step."""

    name: str
    source: str
    config: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def attention(self) -> str:
        if "attention" in self.config:
            return str(self.config["attention"])
        pattern = self.layer_pattern
        return "full" if pattern and "S" not in pattern else "longgen"

    @property
    def layer_pattern(self) -> str:
        model = self.config.get("model") or {}
        return str(self.config.get("layer_pattern") or model.get("layer_pattern") or "")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of rows that logged `key` with a finite number."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values


def _records(data: bytes):
    """Logical records (bytes) of a LevelDB log."""
    if len(data) < _HEADER or data[:4] != b":W&B":
        raise ValueError("not a W&B run file (missing ':W&B' header)")
    pos, pieces = _HEADER, []
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer
            pos += room
            continue
        _checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        start = pos + _HEADER
        if kind == 0 and length == 0:  # zero padding at the end of a block being written
            pos += room
            continue
        chunk = data[start : start + length]
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pieces = [chunk]
        elif kind == _MIDDLE:
            pieces.append(chunk)
        elif kind == _LAST:
            pieces.append(chunk)
            yield b"".join(pieces)
            pieces = []


def _item_value(item):
    which = item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    if which and which not in ("none", "json"):
        return getattr(item, which)
    if item.value_json:
        return json.loads(item.value_json)
    return None


def read_wandb_run(path: str | Path) -> RunRecord:
    """Rows and config of a W&B offline run folder or `.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.wandb"))
    if not files:
        raise ValueError(
            f"{path}: no .wandb file (expected a W&B offline run folder, e.g. wandb/offline-run-*)"
        )
    rows: dict[int, dict] = {}
    config: dict = {}
    name = path.parent.name if path.is_file() else path.name
    for file in files:
        for raw in _records(file.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = _item_value(item)
                step = row.get("_step")
                if step is not None:
                    rows.setdefault(int(step), {}).update(
                        {k: v for k, v in row.items() if not k.startswith("_")}
                    )
            elif kind in ("config", "run"):
                updates = record.config.update if kind == "config" else record.run.config.update
                for item in updates:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        config[key] = json.loads(item.value_json)
                if kind == "run" and record.run.display_name:
                    name = record.run.display_name
    out = [{"step": step, **row} for step, row in sorted(rows.items())]
    return RunRecord(name=name, source=str(path), config=config, rows=out)


def read_run_dir(path: str | Path) -> RunRecord:
    """Rows of `RUN_DIR/metrics.jsonl` (the last row per step wins) and `RUN_DIR/config.json`."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{path}: no metrics.jsonl (expected a run dir written by longgen-train)")
    rows: dict[int, dict] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run
    config_path = path / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    name = (config.get("logging") or {}).get("run_name") or config.get("name") or path.name
    return RunRecord(name=name, source=str(path), config=config, rows=[rows[s] for s in sorted(rows)])


def read_run(path: str | Path) -> RunRecord:
    """A run dir, a W&B offline run folder or a `.wandb` file."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return read_run_dir(path)
    if path.suffix == ".wandb" or list(path.glob("*.wandb")):
        return read_wandb_run(path)
    raise ValueError(f"{path}: neither a run dir (metrics.jsonl) nor a W&B offline run (*.wandb)")
