"""One way to load, override, validate and dump every job config (build, filter, train).

A config is a pydantic model (``ConfigModel``: unknown keys refused, frozen, finite numbers only). Every
command reads it the same way: a YAML file, then ``--set key.path=value`` overrides (one dotted grammar,
list items by index: ``generators.0.model``; values parsed as YAML scalars), then validation. Every mistake
becomes ONE ``ValueError`` line naming the key path (``config.generators.0.num_inference_steps must be >= 1,
got 0``), which the CLI prints with exit 2. ``dump_config`` is the resolved config as strict JSON data.
"""
from __future__ import annotations

import contextvars
import math
import typing
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound="ConfigModel")
ROOT = "config"  # the prefix of every key path in messages (a section of the filter job is called 'filter')


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True)

    def __init__(self, **data: Any):
        if _VALIDATING.get():  # a nested section: its errors reach the outermost call with their key path
            super().__init__(**data)
        else:
            _one_line_errors(type(self), data, lambda: super(ConfigModel, self).__init__(**data))

    @classmethod
    def from_dict(cls: type[M], data: Any) -> M:
        """Validate a plain mapping (as YAML gives it); one-line ``ValueError`` on any mistake."""
        return _one_line_errors(cls, data, lambda: cls.model_validate(data))


# pydantic runs a custom __init__ for nested models too: only the outermost call turns errors into one line.
_VALIDATING = contextvars.ContextVar("synpref_config_validating", default=False)


def _one_line_errors(cls: type[BaseModel], data: Any, validate):
    check_finite(data, ROOT)
    token = _VALIDATING.set(True)
    try:
        return validate()
    except ValidationError as e:
        raise ValueError(error_line(e, cls)) from None
    finally:
        _VALIDATING.reset(token)


def one_or_many(value: Any) -> Any:
    """A single string where a list of strings is expected means a list of one (``shards: a.tar``)."""
    return [value] if isinstance(value, str) else value


def non_empty(value: Any) -> Any:
    """Locations (output folders, models): empty or missing is a mistake, not the working directory."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("must not be empty: give a folder or URL")
    return value


# ---- loading
def load_yaml(path: str) -> dict:
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping of config keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | dict | None) -> dict:
    """Apply ``a.b.0.c=value`` overrides to a nested dict (in place; returned). String values are parsed
    as YAML (``7`` an int, ``null`` None, ``[a, b]`` a list); an index must name an existing list item."""
    items = (overrides or {}).items() if isinstance(overrides, dict) else map(_split, overrides or [])
    for key, value in items:
        _set_path(data, key, yaml.safe_load(value) if isinstance(value, str) else value)
    return data


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE (e.g. output.output_dir=out/run1), got {item!r}")
    return key.strip(), value


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last, parent = i == len(parts) - 1, ".".join(parts[:i]) or ROOT
        if isinstance(node, list):
            if not part.isdigit():
                raise ValueError(f"--set {key}: {parent} is a list: use an index 0..{len(node) - 1}, not {part!r}")
            if int(part) >= len(node):
                raise ValueError(f"--set {key}: {parent} has {len(node)} item(s) (indices 0..{len(node) - 1}), "
                                 f"no item {part}")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last and node.get(part) is None:
                node[part] = {}
        else:
            raise ValueError(f"--set {key}: {parent} is {node!r}, not a mapping or a list")
        if last:
            node[index] = value
        else:
            node = node[index]


def load_config(model_cls: type[M], path: str, overrides: list[str] | dict | None = None) -> M:
    """The validated config of one command: the YAML at ``path`` with ``--set`` ``overrides`` applied."""
    return model_cls.from_dict(apply_overrides(load_yaml(path), overrides))


def dump_config(cfg: BaseModel) -> dict:
    """The resolved config as JSON data (lists, not tuples; every default filled in)."""
    return cfg.model_dump(mode="json")


def add_config_args(parser, example: str) -> None:
    """``--config`` and ``--set``, declared once for every command that runs a job config."""
    parser.add_argument("--config", required=True, help=f"YAML job config, e.g. {example}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable): --set output.output_dir=out/run1, "
                             "--set generators.0.model=ORG/NAME; values are YAML ('[a, b]' is a list)")


# ---- one-line errors
def check_finite(data: Any, where: str) -> None:
    """NaN or infinity anywhere (reward params included) is refused: every JSON synpref writes is strict."""
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"{where} must be a finite number, got {data}")
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{where}.{k}")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{where}.{i}")


def error_line(err: ValidationError, model_cls: type[BaseModel]) -> str:
    """Every problem pydantic found, as one line of ``<key path>: <what is wrong>`` joined with '; '."""
    unknown: dict[tuple, list[str]] = {}
    missing: dict[tuple, list[str]] = {}
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif e["type"] == "missing":
            missing.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            lines.append(_describe(e, loc, model_cls))
    for loc, names in unknown.items():
        model = _model_at(model_cls, loc)
        valid = f"; valid keys: {sorted(model.model_fields)}" if model else ""
        lines.insert(0, f"{_path(loc)}: unknown key(s) {sorted(names)}{valid}")
    for loc, names in missing.items():
        lines.append(f"{_path(loc)}: missing required config keys {sorted(names)}")
    return "; ".join(" ".join(line.split()) for line in lines)


def _path(loc: tuple) -> str:
    return ".".join([ROOT, *map(str, loc)])


_TYPES = {"int": "int", "float": "float", "bool": "true or false", "string": "a string"}


def _describe(e: dict, loc: tuple, model_cls: type[BaseModel]) -> str:
    kind, value, path = e["type"], e.get("input"), _path(loc)
    got = f"got {value!r}"
    field = _field_at(model_cls, loc)
    if kind == "value_error":  # our validators: "must ..." reads after the key, anything else after a colon
        msg = str(e["ctx"]["error"])
        return msg if not loc else f"{path} {msg}" if msg.startswith("must") else f"{path}: {msg}"
    if kind == "literal_error":
        choices = _literal_choices(field.annotation) if field else None
        quote = " (YAML reads bare no/yes as booleans: quote it)" if isinstance(value, bool) else ""
        return f"{path}: {value!r} is not one of {choices or e['ctx']['expected']}{quote}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{path} must be {_bounds(field) or e['msg'].replace('Input should be ', '')}, {got}"
    if kind == "finite_number":
        return f"{path} must be a finite number, {got}"
    prefix = kind.split("_")[0]
    if prefix in _TYPES and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"{path}: must be {_TYPES[prefix]}, {got}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected a mapping, got {type(value).__name__}"
    if kind in ("list_type", "tuple_type"):
        return f"{path}: expected a list, {got}"
    return f"{path}: {e['msg']}, {got}"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (``X``, ``Optional[X]``, ``tuple[X, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _model_at(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    return model


def _field_at(model_cls: type[BaseModel], loc: tuple):
    """The pydantic ``FieldInfo`` at a key path (None inside dicts or unknown places)."""
    if not loc or isinstance(loc[-1], int):
        return None
    parent = _model_at(model_cls, loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent else None


def _literal_choices(annotation: Any) -> list | None:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        found = _literal_choices(arg)
        if found:
            return found
    return None


def _bounds(field) -> str:
    """'in [0, 0.5)', '>= 1', ... from a field's ``Field`` bounds; '... or null' when it may be null."""
    if field is None:
        return ""
    b = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    num = lambda x: f"{x:g}" if isinstance(x, float) else str(x)
    lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if lo and hi:
        text = f"in {lo[0]}{num(lo[1])}, {num(hi[1])}{hi[0]}"
    elif lo:
        text = f"{'>=' if lo[0] == '[' else '>'} {num(lo[1])}"
    elif hi:
        text = f"{'<=' if hi[0] == ']' else '<'} {num(hi[1])}"
    else:
        return ""
    return text + (" or null" if type(None) in typing.get_args(field.annotation) else "")
