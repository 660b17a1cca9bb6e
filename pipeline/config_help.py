"""``--help`` written from the config dataclasses: every key (dotted), its type, default, allowed values and doc.

The doc of a field is its ``metadata={"doc": ...}`` when given, else the comment above it (or after it) in the
class source; a section's doc is its class docstring. Nothing here imports more than :mod:`pipeline.config`, so
help stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from typing import Any, Literal

from pipeline.config import PRESET_SECTIONS, config_names, preset_names

_FIELD_LINE = re.compile(r"^    (\w+)\s*:[^=]*(=.*)?$")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?\.)(\s|$)", text)
    return (match.group(1) if match else text).rstrip(".")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class body: the ``#`` lines right above a field, or the one after it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in lines:
        stripped = line.strip()
        if line.startswith("    #") and not line.startswith("     "):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(line.split("  #")[0].rstrip())
        if match:
            trailing = line.split("  # ", 1)[1] if "  # " in line else ""
            text = " ".join(pending) or trailing
            if text:
                comments[match.group(1)] = first_sentence(text)
        pending = []
    return comments


def _doc(cls: type) -> str:
    own = cls.__dict__.get("__doc__") or ""
    generated = own.startswith(f"{cls.__name__}(")  # dataclass writes the signature where there is no docstring
    return first_sentence(own) if own.strip() and not generated else ""


def _section_of(tp: Any) -> type | None:
    return tp if dataclasses.is_dataclass(tp) and isinstance(tp, type) else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def key_lines(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """Help lines for every key of ``cls``: its own keys first, then a block per sub-config."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    own, sections = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        section = _section_of(hints[f.name])
        key = prefix + f.name
        if section is not None:
            head = f"{key}:" + (f" {_doc(section)}" if _doc(section) else "")
            notes = []
            if f.name in PRESET_SECTIONS and not prefix:
                notes.append(f"{key}=NAME loads a preset: {', '.join(preset_names(PRESET_SECTIONS[f.name]))}")
            if "path" in {g.name for g in dataclasses.fields(section)}:
                notes.append(f"{key}=URL is short for {key}.path=URL")
            sections.append("")
            sections.append(head)
            sections.extend(f"  ({note})" for note in notes)
            sections.extend(key_lines(section, key + ".", default))
            continue
        doc = f.metadata.get("doc") or comments.get(f.name, "")
        own.append(f"  {key}  ({type_name(hints[f.name])}, default {_value(default)})")
        if doc:
            own.append(f"      {doc}")
    return own + sections


def help_text(cls: type, prog: str, description: str, flags: dict[str, str]) -> str:
    flag_usage = " ".join(f"[{flag}]" for flag in flags)
    lines = [f"usage: {prog} [--config FILE] {flag_usage} [--debug] [key=value ...]".replace("  ", " "), ""]
    if description:
        lines += [textwrap.dedent(description).strip(), ""]
    lines += [
        "Flags may come anywhere on the line. Overrides are OmegaConf key=value pairs (dotted keys).",
        "",
        "flags:",
        (f"  --config FILE  YAML merged over the defaults; a name not found here is looked up in the packaged "
         f"configs ({', '.join(config_names())})"),
        *(f"  {flag}  same as {key}=true" for flag, key in flags.items()),
        "  --debug  print the traceback of a failure, not only its one-line reason",
        "  -h, --help  this text",
        "",
        "keys (type, default) and what they do:",
        *key_lines(cls),
    ]
    return "\n".join(lines) + "\n"
