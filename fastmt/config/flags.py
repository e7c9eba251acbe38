"""Each setting's command-line flag, written once, on its dataclass field.

``opt(default, help, ...)`` makes a settings field that carries its flag's help, choices, type and
metavar; ``override(Base, name, ...)`` restates an inherited field with another default or help (a
command whose defaults or wording differ). ``add_flags`` builds a command's argparse flags from its
settings class, ``settings_kwargs`` reads the parsed flags back as the class's keyword arguments: the
command line and a Python caller make the same object, with the same defaults, through the same checks.

What a field's annotation says picks its flag's form: ``int`` and ``float`` parse as such, ``bool`` is
a switch (``--x``; a field that defaults to True is turned off by its ``flag``, e.g. ``--no-progress``),
``bool | None`` a pair (``--x/--no-x``; None: left to ``fastmt.config.auto``), a list field a
repeatable flag. A field without a default is a required flag.

Flags are listed in ``--help`` grouped by the class that introduces them, the command's own class
first, then its bases (the training flags every command shares last); in each group, as declared.
A settings class names the inherited fields its command does not take as flags in ``not_flags``.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields, is_dataclass

# The flag forms the annotations ask for (the annotations are strings: ``from __future__ import annotations``).
_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}
_TOGGLE = "bool | None"


def opt(default=MISSING, help: str = "", *, factory=MISSING, flag: str | None = None, choices=None, type=None,
        metavar: str | None = None, required: bool = False, one_of: str | None = None) -> Field:
    """A settings field and its flag: ``help`` (``argparse.SUPPRESS`` hides it), ``flag`` (default
    ``--name-with-dashes``), ``choices``, ``type`` (a parser of the flag's text; default from the
    annotation), ``metavar``, ``required`` (on the command line, where the field has a placeholder
    default) and ``one_of`` (flags sharing this name form a group of which exactly one is given)."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices is not None else None, "type": type,
            "metavar": metavar, "required": required, "one_of": one_of}
    return field(default=default, default_factory=factory, metadata=meta)


def override(base, name: str, **changes) -> Field:
    """``base``'s field ``name`` again, with ``changes`` (``default=`` and any of ``opt``'s keywords)."""
    old = base.__dataclass_fields__[name]
    meta = dict(old.metadata)
    default = changes.pop("default", old.default)
    unknown = set(changes) - set(meta)
    if unknown:
        raise TypeError(f"override({base.__name__}, {name!r}): unknown {sorted(unknown)}")
    meta.update(changes)
    return field(default=default, default_factory=old.default_factory if default is MISSING else MISSING,
                 metadata=meta)


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _groups(cls) -> list[list[str]]:
    """Field names by the class that introduces them, ``cls`` first, then its bases."""
    seen: set[str] = set()
    groups = []
    for c in reversed([c for c in cls.__mro__ if is_dataclass(c)]):
        own = {f.name for f in fields(c)}
        new = [n for n in c.__dict__.get("__annotations__", {}) if n in own and n not in seen]
        seen.update(new)
        groups.append(new)
    return groups[::-1]


def flag_fields(cls) -> list[Field]:
    """The fields of settings class ``cls`` that are flags of its command, in ``--help``'s order."""
    by_name = {f.name: f for f in fields(cls)}
    skip = set(getattr(cls, "not_flags", ()))
    return [by_name[n] for group in _groups(cls) for n in group if n not in skip]


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add a flag to ``parser`` for every flag field of ``cls`` (its ``dest`` is the field's name)."""
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in flag_fields(cls):
        m = f.metadata
        kw: dict = {"dest": f.name, "help": m.get("help") or None}
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        default = f.default if f.default is not MISSING else None
        names = [flag_name(f)]
        if f.type == _TOGGLE:
            kw.update(action=argparse.BooleanOptionalAction, default=default)
        elif f.type == "bool":
            kw.update(action="store_false" if default else "store_true", default=default)
        elif f.default_factory is list:
            kw.update(action="append", default=None)  # argparse appends to a given list: None, then the field's
        else:
            kw["default"] = default
            parse = m.get("type") or _TYPES.get(f.type)
            if parse is not None:
                kw["type"] = parse
        if m.get("choices") is not None:
            kw["choices"] = list(m["choices"])
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        one_of = m.get("one_of")
        if one_of:
            if one_of not in exclusive:
                exclusive[one_of] = parser.add_mutually_exclusive_group(required=True)
            exclusive[one_of].add_argument(*names, **kw)
            continue
        if not has_default or m.get("required"):
            kw.update(required=True, default=None)  # given on every command line: no default to show
        parser.add_argument(*names, **kw)


def settings_kwargs(ns: argparse.Namespace, cls) -> dict:
    """The keyword arguments of ``cls`` that the parsed flags ``ns`` give (a list flag not given: the
    field's own default)."""
    kw = {}
    for f in flag_fields(cls):
        value = getattr(ns, f.name)
        if value is None and f.default_factory is not MISSING:
            continue
        kw[f.name] = value
    return kw
