"""Typed, validated job configs: YAML files plus dotted `key=value` overrides.

Every stage describes its job as a tree of `Section` models. Loading validates the whole tree
before any work starts, so a typo in a 1000-GPU job fails in a second on the laptop that
submitted it, with one line naming the file, the key and the fix.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _must_exist(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return path.resolve()


ExistingPath = Annotated[Path, AfterValidator(_must_exist)]
"""A path that must exist when the config is loaded (inputs, never outputs). It is made
absolute, so Ray workers, whose working directory differs from the driver's, see the same file."""

S = TypeVar("S", bound=Section)


def load_config(cls: type[S], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> S:
    """Read `path` (YAML) if given, apply `key.sub=value` overrides, validate into `cls`."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config {source}: file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config {source}: not valid YAML ({_first_line(err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {source}: the top level must be a mapping, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override, source)
    return validate_config(cls, data, source)


def validate_config(cls: type[S], data: dict[str, Any], source: str = "<dict>") -> S:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(cls, err, source)) from None


def apply_override(data: dict[str, Any], override: str, source: str = "<overrides>") -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`3`, `true`, `[1, 2]`)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"config {source}: override `{override}` is not of the form key.sub=value")
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        child = _child(node, part)
        if child is None:
            child = {}
            _set_child(node, part, child, key)
        elif not isinstance(child, (dict, list)):
            raise ConfigError(f"config {source}: override `{key}`: `{'.'.join(parts[: i + 1])}` is a value, not a section")
        node = child
    _set_child(node, parts[-1], yaml.safe_load(raw) if raw.strip() else "", key)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        index = int(part) if part.isdigit() else None
        return node[index] if index is not None and index < len(node) else None
    return node.get(part)


def _set_child(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"override `{key}`: `{part}` is not an index of a list of {len(node)} items")
        node[int(part)] = value
    else:
        node[part] = value


def config_to_dict(config: Section) -> dict[str, Any]:
    return config.model_dump(mode="json")


def config_to_yaml(config: Section) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_hash(config: Section) -> str:
    """A stable short hash of the effective config: same hash, same job."""
    canonical = json.dumps(config_to_dict(config), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _describe(cls: type[Section], err: ValidationError, source: str) -> str:
    """Turn pydantic's report into one line: the first problem, named by its dotted key."""
    problem = err.errors()[0]
    key = ".".join(str(p) for p in problem["loc"])
    more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if problem["type"] == "extra_forbidden":
        hint = _suggest(cls, key)
        return f"config {source}: unknown key `{key}`{hint}{more}"
    if problem["type"] == "missing":
        return f"config {source}: missing required key `{key}`{more}"
    message = problem["msg"].removeprefix("Value error, ")
    if not key:  # a rule across sections
        return f"config {source}: {message}{more}"
    return f"config {source}: `{key}`: {message} (got {problem.get('input')!r}){more}"


def _suggest(cls: type[Section], key: str) -> str:
    known = list(_field_paths(cls))
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    close = close or [k for k in known if k.split(".")[-1] == leaf]
    close = close or difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _field_paths(cls: type[BaseModel], prefix: str = ""):
    """Every dotted key a config class accepts; list items use the index `N`."""
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        for model, suffix in _nested_models(field.annotation):
            yield from _field_paths(model, f"{path}{suffix}.")


def _nested_models(annotation: Any):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, ""
        return
    is_list = get_origin(annotation) in (list, tuple)
    for arg in get_args(annotation):
        for model, suffix in _nested_models(arg):
            yield model, (".N" if is_list else "") + suffix


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]
