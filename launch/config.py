"""Typed configuration: dataclass schema <- YAML file <- dotted overrides.

OmegaConf's structured configs do the merging and the type checks; this module only turns
their errors into one line that names the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.errors import UserError

T = TypeVar("T")


def _one_line(err: OmegaConfBaseException, source: str) -> str:
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    key = getattr(err, "full_key", None)
    where = f"{source}: " if source else ""
    return f"{where}config key '{key}': {msg}" if key else f"{where}{msg}"


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: list[str] = (), values: dict | None = None
) -> T:
    """Build a ``schema`` instance from its defaults, an optional YAML file and ``key=value`` overrides.

    ``values`` (a nested dict, from command-line flags) sits between the file and the overrides:
    precedence is overrides > flags > file > defaults. Unknown keys and values of the wrong type raise
    :class:`UserError` naming the key; a malformed override names the override.
    """
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of config keys at the top level")
        try:
            merged = OmegaConf.merge(merged, data)
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err, str(path))) from None
    if values:
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err, "command-line flag")) from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}': expected key=value, e.g. data.seq_len=512")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err, f"override '{item}'")) from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(_one_line(err, "")) from None
    except ValueError as err:  # a dataclass's own check (__post_init__), which names its key
        raise UserError(f"{path or 'config'}: {err}") from None


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-ready dict of a config dataclass (enums as their names)."""
    assert dataclasses.is_dataclass(cfg)
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def leaves(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a config dict's dotted keys."""
    out = {}
    for k, v in d.items():
        out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, the form written next to every output."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
