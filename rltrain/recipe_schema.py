"""The recipe reference: every field of the recipe schema with its type, default and description.

``rltrain recipe schema`` prints it; it is read off the pydantic models in :mod:`rltrain.recipes` (the same
objects the Python API takes: ``GRPO(...)`` is the ``algorithm`` section of a GRPO recipe), so it cannot drift
from what a recipe accepts.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from rltrain.recipes import APOSection, GRPOSection, PPOSection, Recipe, SFTSection

#: the algorithm sections, each listed under ``algorithm.*`` with its ``name``
ALGORITHMS: tuple[type[BaseModel], ...] = (GRPOSection, PPOSection, SFTSection, APOSection)


@dataclass(frozen=True)
class FieldDoc:
    path: str
    type: str
    default: str
    description: str


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "(section)"
    return json.dumps(value)


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds, when it holds exactly one (through ``Optional``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 else None


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def _walk(model: type[BaseModel], prefix: str, out: list[FieldDoc]) -> None:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if path == "algorithm":
            out.append(FieldDoc(path, "section | null", "null", info.description or ""))
            for section in ALGORITHMS:
                tag = section.model_fields["name"].default
                out.append(FieldDoc(f"algorithm [{tag}]", section.__name__, "", _doc(section)))
                _walk(section, "algorithm.", out)
            continue
        section = _section(info.annotation)
        description = info.description or (_doc(section) if section else "")
        out.append(FieldDoc(path, _type_name(info.annotation), _default(info), description))
        if section is not None:
            _walk(section, f"{path}.", out)


def schema_fields() -> list[FieldDoc]:
    """Every recipe field in order, sections followed by their fields (``algorithm.*`` once per algorithm)."""
    out: list[FieldDoc] = []
    _walk(Recipe, "", out)
    return out


def render_schema(fmt: str = "text") -> str:
    """The reference as plain text (one block per field) or a markdown table."""
    fields = schema_fields()
    if fmt == "markdown":
        rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        cell = lambda text: text.replace("|", "\\|")  # a pipe would end the table cell
        rows += [f"| `{f.path}` | `{cell(f.type)}` | `{cell(f.default)}` | {cell(f.description)} |" for f in fields]
        return "\n".join(rows) + "\n"
    blocks = []
    for f in fields:
        default = f" = {f.default}" if f.default else ""
        blocks.append(f"{f.path}: {f.type}{default}\n    {f.description}")
    return "\n".join(blocks) + "\n"
