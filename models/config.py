"""Strict configuration models, and the one way every refusal of a model file's contents reads.

Model cards, architectures and preprocessing specs are validated by pydantic in strict mode:
no coercion (`"1"` is no integer, `true` no number, `"false"` no boolean), unknown fields are
errors, values are frozen once built. `explain` turns pydantic's first problem into one line
for the person fixing the file: `"<subject>: <field path>: <what is wrong>"`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

Positive = Annotated[int, Field(ge=1)]
IntPair = Annotated[tuple[int, int], Strict(False)]
"""(rows, cols); a JSON list in a file. Its items stay strict integers."""
PositivePair = Annotated[tuple[Positive, Positive], Strict(False)]
Sizes = Annotated[tuple[Positive, ...], Strict(False), Field(min_length=1)]
"""One positive integer per layer, stage or block: at least one."""


class StrictConfig(BaseModel):
    """A frozen, strictly validated config section; `from_dict` refuses with one clear line."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid", allow_inf_nan=False)

    subject: ClassVar[str] = "configuration"
    """Names the section in messages, e.g. "GMIC architecture"."""
    derived_fields: ClassVar[tuple[str, ...]] = ()
    """Fields a file may carry that are derived, checked and not stored as such."""
    error: ClassVar[type[ValueError]] = ValueError

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Validate `data` (e.g. a card's `architecture`), raising `cls.error` with `explain`'s
        message."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise cls.error(explain(exc, cls.subject, model=cls)) from None

    def to_dict(self) -> dict[str, Any]:
        """What a model card stores (lists for tuples)."""
        return self.model_dump(mode="json")


_OBJECT_TYPES = {"model_type", "model_attributes_type", "dataclass_type", "dict_type"}
_UNKNOWN_TYPES = {"extra_forbidden", "unexpected_keyword_argument"}
_WORDS = {
    "string_type": "must be a string",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
}


def explain(
    exc: ValidationError,
    subject: str,
    *,
    model: type | None = None,
    advice: str = "",
    hints: Mapping[str, str] | None = None,
) -> str:
    """The first problem of `exc`, as `"<subject>: <path>: <problem>"`.

    Unknown and missing fields are listed together (with `advice`, what to do about a file that
    has them); `model` (the validated type) lets the message name the known fields and drop
    pydantic's union tags from paths; `hints` adds advice per top-level field.
    """
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"{subject} is not valid JSON ({first['msg']})"
    if first["type"] in _OBJECT_TYPES and not first["loc"]:
        return f"{subject} is a JSON {_json_type(first['input'])}, not an object"
    for kinds, problem in ((_UNKNOWN_TYPES, "unknown fields"), ({"missing"}, "missing fields")):
        group = [e for e in errors if e["type"] in kinds]
        if group:
            parent = group[0]["loc"][:-1]
            names = [str(e["loc"][-1]) for e in group if e["loc"][:-1] == parent]
            path, at, kind = _walk(model, parent)
            text = f"{problem} {names}"
            if at is not None and problem == "unknown fields":
                text += f" for kind {kind!r}" if kind else ""
                text += f"; known: {sorted(_fields_of(at))}"
            return _line(subject, path, text + (f"; {advice}" if advice else ""))
    path, at, _ = _walk(model, first["loc"])
    if first["type"].startswith("union_tag"):
        discriminator = first["ctx"]["discriminator"].strip("'")
        path = f"{path}.{discriminator}" if path else discriminator
    hint = (hints or {}).get(str(first["loc"][0])) if first["loc"] else None
    return _line(subject, path, _problem(first) + (f"; {hint}" if hint else ""))


def _line(subject: str, path: str, problem: str) -> str:
    return f"{subject}: {path}: {problem}" if path else f"{subject}: {problem}"


def _problem(error: dict[str, Any]) -> str:
    kind, value = error["type"], error.get("input")
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", error["msg"])
    if kind == "union_tag_invalid":
        return f"must be one of {error['ctx']['expected_tags']}, got {error['ctx']['tag']!r}"
    if kind == "union_tag_not_found":
        return "missing"
    words = _WORDS.get(kind) or re.sub(r"^\w+ should", "must", error["msg"])
    words = words.replace(" after validation", "")
    return f"{words}, got {value!r}"


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )


def _walk(model: type | None, loc: tuple[Any, ...]) -> tuple[str, type | None, str | None]:
    """`loc` as a path a person reads (pydantic's union tags dropped), the model class it ends
    on (None where unknown) and, when a union tag chose that class, the tag."""
    parts: list[str] = []
    current: Any = model
    tag = None
    for item in loc:
        members = _models_in(current)
        tagged = [m for m in members if len(members) > 1 and _kind_of(m) == item]
        if tagged:
            current, tag = tagged[0], item
            continue
        parts.append(f"[{item}]" if isinstance(item, int) else f".{item}")
        current = _fields_of(members[0]).get(item) if len(members) == 1 else None
        tag = None
    members = _models_in(current)
    return "".join(parts).lstrip("."), members[0] if len(members) == 1 else None, tag


def _models_in(tp: Any) -> list[type]:
    """The model classes an annotation may hold: one, several (a union), or none."""
    if isinstance(tp, type) and (issubclass(tp, BaseModel) or dataclasses.is_dataclass(tp)):
        return [tp]
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _models_in(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _models_in(arg)]
    return []


def _fields_of(model: type) -> dict[str, Any]:
    if issubclass(model, BaseModel):
        derived = dict.fromkeys(getattr(model, "derived_fields", ()))
        return {name: f.annotation for name, f in model.model_fields.items()} | derived
    hints = typing.get_type_hints(model, include_extras=True)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(model)}


def _kind_of(model: type) -> str | None:
    """The `kind` tag of one member of a discriminated union."""
    annotation = _fields_of(model).get("kind")
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)[0]
    return None
