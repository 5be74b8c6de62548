"""Command-line overrides: `section.field=value` items applied to a `LongGenConfig`.

Values are coerced to the field's declared type; every error names the item, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from megatron_longgen.config.schema import LongGenConfig


def _coerce(value: str, annotation: typing.Any) -> typing.Any:
    """Turn the text of a `--override` into the field's declared type."""
    text = value.strip()
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"Literal": Literal})
    args = typing.get_args(annotation)
    if type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    return text


def apply_overrides(cfg: LongGenConfig, overrides: list[str]) -> LongGenConfig:
    """Apply `section.field=value` overrides (e.g. `train.lr=3e-4`, `model.layer_pattern=SSFFSS`).

    All overrides are collected first and each section is rebuilt once, so fields that are validated
    together (e.g. `model.num_layers` and `model.layer_pattern`) can change together; a later override of
    the same field wins. Raises ValueError for malformed items and unknown sections or fields, listing the
    valid names.
    """
    sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    changes: dict[str, dict[str, typing.Any]] = {}
    name_override: str | None = None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        path, value = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) == 1 and parts[0] == "name":
            name_override = value
            continue
        if len(parts) != 2:
            raise ValueError(f"override {item!r} must look like section.field=value")
        section, name = parts
        if section not in sections:
            raise ValueError(f"unknown config section {section!r}; choose from {sorted(sections)}")
        sub = getattr(cfg, section)
        fields = {f.name for f in dataclasses.fields(sub)}
        if name not in fields:
            raise ValueError(f"unknown field {section}.{name}; {section} has {sorted(fields)}")
        hints = typing.get_type_hints(type(sub))
        try:
            coerced = _coerce(value, hints[name])
        except ValueError as exc:
            kind = getattr(hints[name], "__name__", str(hints[name]))
            raise ValueError(f"override {section}.{name}={value!r}: expected {kind} ({exc})") from None
        changes.setdefault(section, {})[name] = coerced
    replaced = {section: dataclasses.replace(getattr(cfg, section), **kw) for section, kw in changes.items()}
    if name_override is not None:
        replaced["name"] = name_override
    return dataclasses.replace(cfg, **replaced) if replaced else cfg
