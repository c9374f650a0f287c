"""Stage parameters: one section of params.yaml, checked against a small schema.

    SCHEMA = {"workers": Param(int, min=1), "splits": Param(list, item=str), "rate": Param(float, min=0)}
    p = load_section("params.yaml", "cache_teacher", SCHEMA)   # dict, or ParamError naming the key

A ParamError names the dotted key (`cache_teacher.workers must be ...`); the stage's command line puts the
parameters file it read in front (cgspn.pipeline.cli), so a typo in a `dvc exp run -S` override is found, and
named, before any work starts. A problem with the file itself is an InputError naming the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cgspn.pipeline.errors import InputError, ParamError


@dataclass(frozen=True)
class Param:
    type: type | tuple[type, ...]
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    item: type | None = None  # element type when `type` is list
    optional: bool = False  # None is allowed
    length: int | None = None  # exact length when `type` is list
    auto: bool = False  # the string "auto" is allowed too (the stage works the value out from its data)

    def check(self, where: str, value: Any) -> Any:
        if value is None and self.optional:
            return None
        if self.auto and value == "auto":
            return value
        kinds = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in kinds and int not in kinds:
            kinds = kinds + (int,)  # `1` is a fine value for a float parameter
        # bool is an int in Python; a flag written where a number belongs is a mistake.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds) + (' or "auto"' if self.auto else "")
            raise ParamError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(f"{where} must be a finite number, got {value!r}")
        if self.length is not None and len(value) != self.length:
            raise ParamError(f"{where} must have {self.length} entries, got {len(value)}: {value!r}")
        if self.item is not None:
            for i, v in enumerate(value):
                Param(self.item, self.min, self.max, self.choices).check(f"{where}[{i}]", v)
            return list(value)
        if self.min is not None and value < self.min:
            raise ParamError(f"{where} must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ParamError(f"{where} must be <= {self.max}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        return value


def check_section(section: dict, schema: dict[str, Param], where: str) -> dict:
    """Validate `section` (the dict under one params.yaml key) against `schema`; returns a plain dict."""
    if not isinstance(section, dict):
        raise ParamError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(schema))
    if unknown:
        raise ParamError(f"{where}: unknown key(s) {unknown}; known: {sorted(schema)}")
    missing = sorted(k for k, p in schema.items() if k not in section and not p.optional)
    if missing:
        raise ParamError(f"{where}: missing key(s) {missing}")
    return {k: p.check(f"{where}.{k}", section.get(k)) for k, p in schema.items()}


def load_section(path: str | Path, name: str, schema: dict[str, Param]) -> dict:
    """Read `path` (params.yaml) and return its section `name`, checked against `schema`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such parameters file") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a mapping of sections")
    if name not in data:
        raise InputError(f"{path}: no section {name!r} (sections: {sorted(data)})")
    return check_section(data[name], schema, name)
