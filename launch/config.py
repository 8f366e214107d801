"""Typed configuration: dataclass schema <- YAML file <- dotted overrides.

OmegaConf's structured configs do the merging and the type checks; this module turns their
errors into one line that names the key (and the file or override it came from), and refuses a
number outside the interval its field declares (``field(metadata={"range": "[0, 1)"})``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_prep.errors import UserError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: YAML forbids it, and PyYAML
    keeps the last one without a word (a preset edited twice ran with whichever came later)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *anchor: its keys may be given again, to override)
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


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
    stages = []  # (where a value came from, the merge up to it): to name the source of a refusal
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.load(path.read_text(), Loader=_Loader) or {}  # (a SafeLoader)
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
        stages.append((str(path), merged))
    if values:
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err, "command-line flag")) from None
        stages.append(("command-line flag", merged))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}': expected key=value, e.g. data.seq_len=512")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(_one_line(err, f"override '{item}'")) from None
        stages.append((f"override '{item}'", merged))
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise UserError(_one_line(err, "")) from None
    except ValueError as err:  # a dataclass's own check (__post_init__), which names its key
        raise UserError(f"{_first_refused(stages)}: {err}") from None
    check_ranges(cfg)
    return cfg


def _first_refused(stages: list) -> str:
    """The file, flag or override whose value a dataclass's own check refuses: the first stage
    that no longer builds."""
    for where, merged in stages:
        try:
            OmegaConf.to_object(merged)
        except ValueError:
            return where
    return "config"


_INTERVAL = re.compile(r"([\[(])(-?[\d.e+-]+|-inf), *(-?[\d.e+-]+|inf)([\])])")


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Refuse, naming the key, a number (or a list's item) outside the interval its field's
    ``metadata["range"]`` declares: ``"[1, inf)"``, ``"(0, 1)"``, ``"[0, 1]"``."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        if "range" not in f.metadata:
            continue
        text = f.metadata["range"]
        opening, low, high, closing = _INTERVAL.fullmatch(text).groups()
        low, high = float(low), float(high)
        for v in value if isinstance(value, list) else [value]:
            above = v > low or (v == low and opening == "[")  # (false for a NaN)
            below = v < high or (v == high and closing == "]")
            if not (above and below):
                if math.isinf(high):
                    bound = f"at least {low:g}" if opening == "[" else f"above {low:g}"
                    raise UserError(f"config key '{key}': {v}: must be {bound}")
                raise UserError(f"config key '{key}': {v} is outside {text}")


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
