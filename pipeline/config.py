"""Configs: frozen dataclasses, strict YAML loading, `key=value` overrides, stable hashes.

Every stage and loop has a frozen dataclass config with a docstring under each field. This module
turns YAML files and command-line overrides into those dataclasses, strictly: an unknown key, an
unknown section, a value of the wrong type or out of range (a dataclass's ``__post_init__`` raising
ValueError) is a :class:`ConfigError` naming the key and the file, never silently ignored.

YAML is read with bounds: a file larger than :data:`MAX_CONFIG_BYTES`, a document whose aliases
expand to more than :data:`MAX_CONFIG_NODES` values or that nests deeper than :data:`MAX_CONFIG_DEPTH`
is refused before anything walks it, and values quoted in error messages are cut short.

A file of *sections* (``render:``, ``executor:``, ``finetune:`` ...) is read by
:func:`read_sections`: every top-level key must name a section the command knows, and every
section present is checked against its class, also those the command does not use; a file
without any section key is the whole config of the command's own section (a run's own
``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import reprlib
import stat
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

from pipeline.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit its dataclass."""


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused: configs are a few kB, and a YAML parser
holds the whole document."""
MAX_CONFIG_NODES = 100_000
"""Values a document may hold once its aliases are expanded (a YAML "billion laughs" is a few
lines whose aliases expand to billions)."""
MAX_CONFIG_DEPTH = 64
"""Nesting a document may have."""

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 80
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = 6
_short_repr.maxlevel = 3


def short(value: Any) -> str:
    """A repr of a config value for an error message, cut short (a value can be huge)."""
    return _short_repr.repr(value)


def _check_size(value: Any, where: str) -> None:
    """Refuse a loaded YAML document whose aliases expand beyond MAX_CONFIG_NODES values, that
    nests deeper than MAX_CONFIG_DEPTH, or that refers to itself. Shared objects (aliases) are
    counted once per use without being expanded, so the check itself is linear in the file."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def count(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ConfigError(f"{where}: a YAML alias refers to itself (a recursive document)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        open_.add(key)
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += count(child, depth + 1)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{where}: the document expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases?); "
                    "a config is far smaller"
                )
        open_.discard(key)
        sizes[key] = total
        return total

    count(value, 0)


def parse_yaml(text: str, where: str) -> Any:
    """Safe-load one YAML document with the bounds above; ConfigError naming ``where``."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than a config may have ({MAX_CONFIG_BYTES:,})")
    try:
        value = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    _check_size(value, where)
    return value


def read_yaml(path: str | Path) -> Any:
    """The YAML document of a config file, read with bounds (size, aliases, nesting).

    The file must be a regular file or a pipe (``--config <(...)``); a device or a folder is
    refused, and no more than MAX_CONFIG_BYTES are read from anything.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError(f"{path}: not a regular file")
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than a config may be ({MAX_CONFIG_BYTES:,} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_yaml(text, str(path))


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A config file whose top level is a mapping (an empty file is an empty mapping)."""
    loaded = read_yaml(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {short(loaded)}")
    return loaded


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint` and convert YAML-natural forms (list -> tuple)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}: expected one of {get_args(hint)}, got {short(value)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {short(value)} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {hint.__name__}, got {short(value)}")
        return from_dict(hint, value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short(value)}")
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_hint = args[0] if args else Any
            items = [_convert(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short(value)}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short(value)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short(value)}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {short(value)}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, strictly: an unknown key, a wrong type or a value its
    ``__post_init__`` refuses (ValueError/TypeError) is a ConfigError naming ``where`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {short(data)}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        near = _did_you_mean(unknown, names)
        known = "" if near and len(names) > 12 else f"; known: {sorted(names)}"  # a long list hides the hint
        raise ConfigError(f"{where}: unknown key(s) {unknown}{near} for {cls.__name__}{known}")
    kwargs = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # a __post_init__ check of values (ranges, combinations)
        raise ConfigError(f"{where}: {exc}") from None


def _did_you_mean(unknown: Sequence[str], known: typing.Iterable[str]) -> str:
    import difflib

    guesses = [m for u in unknown for m in difflib.get_close_matches(u, list(known), n=1)]
    return f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML so that numbers and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {short(text)}: expected key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {short(text)}: empty key")
    return key.strip().split("."), parse_yaml(raw, f"override {key.strip()}") if raw.strip() else ""


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def _check_override(cls: type, keys: list[str]) -> None:
    """An override's dotted key must name a field (through nested configs); a mapping-typed field
    (e.g. ``ingest.reader``) takes any key below it, checked where it is used."""
    hint: Any = cls
    for depth, part in enumerate(keys):
        if not dataclasses.is_dataclass(hint):
            if get_origin(hint) is dict or hint is dict or hint is Any:
                return
            raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:depth])} is not a section")
        names = {f.name for f in dataclasses.fields(hint) if f.init}
        if part not in names:
            near = _did_you_mean([part], names)
            known = "" if near and len(names) > 12 else f"; known: {sorted(names)}"
            raise ConfigError(f"override {'.'.join(keys)}: unknown key {part!r}{near} for {hint.__name__}{known}")
        hint = get_type_hints(hint)[part]
        if get_origin(hint) in (Union, types.UnionType):  # Optional[SomeConfig]
            args = [a for a in get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else hint


def resolve(cls: type[T], data: Mapping[str, Any] | None = None, overrides: typing.Sequence[str] = (), *,
            base: T | None = None, where: str | None = None) -> T:
    """A config from `base` (or the dataclass defaults), then a mapping, then `key=value` overrides."""
    merged: dict[str, Any] = to_dict(base) if base is not None else {}
    merged = _merge(merged, dict(data or {}))
    for text in overrides:
        keys, value = parse_override(text)
        _check_override(cls, keys)
        _set_path(merged, keys, value)
    return from_dict(cls, merged, where=where or cls.__name__)


def read_sections(path: str | Path, sections: Mapping[str, type], *, reads: Sequence[str],
                  flat: str | None = None) -> dict[str, dict[str, Any]]:
    """The sections of a config file, each checked whole against its class.

    Args:
        path: the YAML file.
        sections: every section such a file may hold, with its config class (a command's own
            sections and its siblings': a shared file for several commands is checked whole).
        reads: the sections the command uses; a file with none of them configures nothing for it,
            which is an error rather than silence.
        flat: the section a file without any section key stands for (the command's own: a run's
            resolved ``config.yaml`` has no sections); None: such a file is an error.

    Returns:
        {section: its mapping} for the sections in ``reads`` that the file has.

    Raises:
        ConfigError: an unknown section (named, with the known ones), a section that does not fit
        its class, a flat file that fits another section's class (said so), nothing for ``reads``.
    """
    data = read_mapping(path)
    if not data:
        return {}
    keys = [str(k) for k in data]
    if not set(keys) & set(sections):
        if flat is None:
            raise ConfigError(f"{path}: no section {sorted(sections)} in it (it has {short(keys)})")
        try:
            from_dict(sections[flat], data, where=str(path))
        except ConfigError as exc:
            fields = {f.name for f in dataclasses.fields(sections[flat])}
            strays = [k for k in keys if k not in fields]
            near = _did_you_mean(strays, sections)
            if near:  # a misspelled section, not a key of the command's own config
                raise ConfigError(f"{path}: unknown section(s) {strays}{near}; known: {sorted(sections)}") from None
            for other, other_cls in sections.items():
                if other != flat and _fits(other_cls, data):
                    raise ConfigError(
                        f"{path}: a `{other}` config (the config.yaml of a `ws3d {other}` run?), not a `{flat}` one; "
                        f"give `{flat}` a `{flat}:` section or a config of its own"
                    ) from None
            raise exc from None
        return {flat: data}
    unknown = sorted(k for k in keys if k not in sections)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}{_did_you_mean(unknown, sections)}; "
                          f"known: {sorted(sections)}")
    for name, value in data.items():
        from_dict(sections[name], value if value is not None else {}, where=f"{path}:{name}")
    used = {name: dict(data[name] or {}) for name in reads if name in data}
    if not used:
        raise ConfigError(f"{path}: nothing in it for this command: it has section(s) {sorted(keys)}, "
                          f"the command reads {list(reads)}")
    return used


def _fits(cls: type, data: dict[str, Any]) -> bool:
    try:
        from_dict(cls, data)
    except ConfigError:
        return False
    return True


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    base: T | None = None,
    section: str | None = None,
) -> T:
    """Resolve a config: `base` (or the dataclass defaults), then the YAML file, then overrides.

    Args:
        cls: the config dataclass.
        path: an optional YAML file (read with bounds, see :func:`read_yaml`). Without `section` it
            is the config itself; with `section` a file of sections (see :func:`read_sections`)
            of which this one is read, or a file without sections standing for this one.
        overrides: `key=value` strings; dotted keys reach nested configs.
        base: a preset to start from instead of the defaults.
    """
    data: dict[str, Any] = {}
    where = cls.__name__
    if path is not None:
        if section is None:
            data = read_mapping(path)
            where = str(path)
        else:
            data = read_sections(path, {section: cls}, reads=(section,), flat=section).get(section, {})
            where = f"{path}:{section}"
    return resolve(cls, data, overrides, base=base, where=where)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_hash(cfg: Any, *upstream: str) -> str:
    """A short stable hash of a config and the hashes of the stage outputs it consumed."""
    payload = json.dumps({"cfg": to_dict(cfg), "up": list(upstream)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
