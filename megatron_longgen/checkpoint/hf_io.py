"""Reading and writing Hugging Face checkpoint folders, one shard at a time.

Reads `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, `pytorch_model.bin` or
sharded `.bin` with `pytorch_model.bin.index.json` (loaded with `weights_only=True` and `mmap=True`).
Writes safetensors shards named the way `transformers` does (`model-00001-of-00003.safetensors` plus an
index, or a single `model.safetensors`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

_SAFE_INDEX = "model.safetensors.index.json"
_SAFE_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


class HFCheckpointReader:
    """The tensor files of an HF folder: which keys live in which shard, and lazy per-shard access."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.root = Path(hf_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"HF checkpoint folder {self.root} does not exist")
        self.format, self.shard_keys = self._discover()

    def _discover(self) -> tuple[str, dict[str, list[str]]]:
        for index_name, fmt in ((_SAFE_INDEX, "safetensors"), (_BIN_INDEX, "bin")):
            index = self.root / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise ValueError(f"{index} is not a valid checkpoint index ({err})") from err
                shards: dict[str, list[str]] = {}
                for key, name in weight_map.items():
                    shards.setdefault(name, []).append(key)
                for name in shards:
                    if not (self.root / name).is_file():
                        raise FileNotFoundError(
                            f"{index} lists shard {name}, which is missing from {self.root}"
                        )
                return fmt, dict(sorted(shards.items()))
        if (self.root / _SAFE_SINGLE).is_file():
            return "safetensors", {_SAFE_SINGLE: self._keys_of(_SAFE_SINGLE, "safetensors")}
        if (self.root / _BIN_SINGLE).is_file():
            return "bin", {_BIN_SINGLE: self._keys_of(_BIN_SINGLE, "bin")}
        raise FileNotFoundError(
            f"no weights in {self.root}: expected {_SAFE_SINGLE}, {_SAFE_INDEX}, "
            f"{_BIN_SINGLE} or {_BIN_INDEX}"
        )

    def _keys_of(self, name: str, fmt: str) -> list[str]:
        with self.open_shard(name, fmt=fmt) as shard:
            return list(shard.keys())

    def keys(self) -> set[str]:
        return {k for keys in self.shard_keys.values() for k in keys}

    def shard_bytes(self) -> dict[str, int]:
        return {name: (self.root / name).stat().st_size for name in self.shard_keys}

    @contextlib.contextmanager
    def open_shard(self, name: str, *, fmt: str | None = None) -> Iterator[_Shard]:
        """Context manager giving `keys()` and `get(key)` for one shard file; errors name the file."""
        fmt = fmt or self.format
        path = self.root / name
        if fmt == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    yield _Shard(path=path, keys=lambda: list(handle.keys()), get=handle.get_tensor)
            except SafetensorError as err:
                raise ValueError(f"cannot read safetensors file {path}: {err}") from err
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
                raise ValueError(f"cannot read torch checkpoint {path}: {err}") from err
            if not isinstance(state, dict):
                raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
            yield _Shard(path=path, keys=lambda: list(state.keys()), get=state.__getitem__)
            del state


class _Shard:
    def __init__(self, *, path: Path, keys, get):
        self.path, self.keys, self._get = path, keys, get

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._get(key)
        except KeyError as err:
            raise ValueError(f"{self.path} has no tensor {key!r} although its index lists it") from err
        except Exception as err:  # safetensors reports truncated data only when a tensor is read
            raise ValueError(f"cannot read tensor {key!r} from {self.path}: {err}") from err


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, without holding the file in memory.

    `safetensors.torch.save_file` serialises the whole shard into one buffer first (2x the shard in RAM);
    here the header is written up front from the planned (name, shape, dtype) list, and each tensor's bytes
    are appended as it arrives, in that order. Format: 8-byte little-endian header length, JSON header
    (padded with spaces to a multiple of 8), then the tensors back to back.
    """

    def __init__(
        self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], *, metadata: dict
    ):
        header: dict = {"__metadata__": metadata}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.path = path
        self._expected = list(entries)
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_shape, want_dtype = self._expected.pop(0)
        if (name, tuple(tensor.shape), tensor.dtype) != (want_name, tuple(want_shape), want_dtype):
            raise AssertionError(
                f"{self.path}: expected {want_name} {tuple(want_shape)} {want_dtype}, got "
                f"{name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        # Raw little-endian bytes of the contiguous tensor, no copy.
        self._handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    @property
    def complete(self) -> bool:
        return not self._expected

    def discard(self) -> None:
        """Close without the completeness check (the caller is abandoning the output)."""
        self._handle.close()

    def close(self) -> None:
        self._handle.close()
        assert self.complete, f"{self.path}: {len(self._expected)} tensors never written"


def plan_shards(sizes: list[tuple[str, int]], *, max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) in order into shards of at most max_shard_bytes (a tensor larger than
    the limit gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [_SAFE_SINGLE]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_index(out_dir: Path, *, weight_map: dict[str, str], total_size: int) -> None:
    """`model.safetensors.index.json`, only written for multi-shard outputs."""
    if len(set(weight_map.values())) <= 1:
        return
    payload = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / _SAFE_INDEX).write_text(json.dumps(payload, indent=2) + "\n")
