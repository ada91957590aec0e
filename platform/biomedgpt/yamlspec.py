"""Typed YAML loading: a dataclass schema filled from a parsed YAML mapping, strictly.

Job specs, serving specs (`biomedgpt.spec`) and dataset specs (`biomedgpt.data.dataset_spec`) are all
loaded through `build`. Unknown keys are errors with a "did you mean" suggestion; every value is
checked against its field's type (str, int, float, bool, Literal, list, dict, nested dataclasses and
unions of these with None); a field without a default is required; every error names the file and
the field path. Fields with `metadata={"internal": True}` (where a spec was read from) are not YAML
keys. Each family of files keeps its own wording through a `Dialect`, and its own error class.

Two leniencies apply to every family: a number written as a string (YAML 1.1 reads `5e-5` as one) is a
number, and a mapping field left empty (`options:`) is an empty mapping.

    spec = build(JobSpec, yaml.safe_load(text), file="jobs/x.yaml", dialect=JOB_DIALECT)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union


class SchemaError(ValueError):
    """A YAML document does not fit its schema. The message names the file and the field path."""


@dataclass(frozen=True)
class Dialect:
    """How one family of YAML files words its problems (the error class, how a field is named, the word
    for an unknown key, the message of a missing one)."""

    error: type[SchemaError] = SchemaError
    quote_fields: bool = False
    """Name fields as `field 'a.b'` (else `a.b`, and `top level` for the document)."""
    unknown: str = "unknown field"
    list_known: bool = False
    """Name every known key after an unknown one (else only a close match, or the list when none is close)."""
    missing: str = "required field is missing"
    """The message of a missing required field; `{expected}` is replaced by the field's type in words."""

    def where(self, path: str) -> str:
        if self.quote_fields:
            return f"field '{path or '<document>'}'"
        return path or "top level"

    def fail(self, file: str, path: str, message: str) -> SchemaError:
        return self.error(f"{file}: {self.where(path)}: {message}")


def type_name(tp: Any) -> str:
    """A field type in words, as error messages name it ("an integer", "one of 'a', 'b'", ...)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_plural(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Any: "any value",
          type(None): "null"}
_PLURALS = {str: "strings", int: "integers", float: "numbers", bool: "true/false values", Any: "values"}


def _plural(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_plural(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "values among " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict) or dataclasses.is_dataclass(tp):
        return f"items that are {type_name(tp)}"
    return _PLURALS.get(tp, getattr(tp, "__name__", str(tp)))


def _shape_fits(value: Any, tp: Any) -> bool:
    """Whether a union alternative is the one a value of this shape is meant for (its errors then explain
    the problem better than "expected X or Y")."""
    origin = typing.get_origin(tp)
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    return isinstance(value, list) and origin is list


def convert(value: Any, tp: Any, path: str, file: str, dialect: Dialect) -> Any:
    """`value` checked against `tp` (and converted: dataclasses built, ints as floats where a number is
    expected); raises `dialect.error` naming `file` and `path`."""
    def mismatch() -> SchemaError:
        return dialect.fail(file, path, f"expected {type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if _shape_fits(value, option):
                return convert(value, option, path, file, dialect)
        for option in options:
            if option is not type(None):
                try:
                    return convert(value, option, path, file, dialect)
                except SchemaError:
                    continue
        raise mismatch()
    if tp is type(None):
        if value is not None:
            raise mismatch()
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise mismatch()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise dialect.fail(file, path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [convert(v, item, f"{path}[{i}]", file, dialect) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise dialect.fail(file, path, f"expected a mapping, got {value!r}")
        key_tp, item = typing.get_args(tp)
        return {convert(k, key_tp, f"{path}.{k}", file, dialect): convert(v, item, f"{path}.{k}", file, dialect)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, file=file, dialect=dialect, path=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise mismatch()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise mismatch()
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise mismatch() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise mismatch()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise mismatch()
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def build(cls: type, data: Any, *, file: str, dialect: Dialect = Dialect(), path: str = "") -> Any:
    """An instance of the dataclass `cls` from the mapping `data` (see the module docstring)."""
    if not isinstance(data, dict):
        raise dialect.fail(file, path, f"expected a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        if dialect.list_known:
            message = f"{dialect.unknown}; expected one of: {', '.join(fields)}{suggestion}"
        else:
            message = f"{dialect.unknown}{suggestion or ' (known: ' + ', '.join(fields) + ')'}"
        raise dialect.fail(file, prefix + key, message)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(data[name], hints[name], prefix + name, file, dialect)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise dialect.fail(file, prefix + name, dialect.missing.format(expected=type_name(hints[name])))
    return cls(**kwargs)
