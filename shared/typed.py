"""One mechanism that turns plain values (msgpack / TOML) into dataclasses and back.

The wire codec and the config loader both describe their data as (frozen) dataclasses
and convert with :func:`from_plain` / :func:`to_plain`, driven only by type hints:
nested dataclasses, ``list[T]``, ``tuple[T, ...]``, ``dict[K, V]``, ``X | None``,
``Literal[...]``, enums, ``Path``, ``Any`` (any plain value, depth-capped) and the scalars
``bool``, ``int``, ``float``, ``str``, ``bytes``. There is no per-type code.

Conversion never stops at the first problem: it records every :class:`Problem` (with a
path such as ``body.profile.cpu_count``) and lets the caller decide, so the codec can
raise one precise typed error while the config loader reports everything at once.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.errors import FedSodaError

ProblemKind = Literal["missing", "type", "unknown", "value"]

DEFAULT_MAX_DEPTH = 32
"""How deeply an ``Any`` field may nest lists and maps."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a plain value.

    Attributes:
        kind: ``missing`` (required field absent), ``type`` (wrong type or disallowed value),
            ``unknown`` (a key no field has; converters drop it), ``value`` (the dataclass's
            own validation refused it).
        path: Where, e.g. ``body.profile.cpu_count`` or ``training.target_modules[2]``.
        message: What was wrong, in words.
        error: For ``value`` problems, the exception the dataclass raised.
    """

    kind: ProblemKind
    path: str
    message: str
    error: Exception | None = None

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


class _Invalid:
    """Marker returned where a value could not be converted (a Problem says why)."""

    __slots__ = ()


INVALID: Any = _Invalid()


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Any, bool], ...]:
    """(name, resolved type hint, required) for each init field of a dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, hints[f.name], required))
    return tuple(out)


def field_hints(cls: type) -> dict[str, Any]:
    """The resolved type hint of each init field of a dataclass.

    Args:
        cls: A dataclass type.

    Returns:
        Field name -> type hint (strings already resolved).
    """
    return {name: hint for name, hint, _ in _fields(cls)}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


_REPR = reprlib.Repr()
_REPR.maxlevel = 4
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value: Any) -> str:
    """A repr of at most about 60 characters that costs little whatever ``value`` is.

    Received values may be 200 MiB of bytes or lists nested a thousand levels deep; a plain
    ``repr`` would copy the first and overflow the stack on the second.

    Args:
        value: Anything (typically a received plain value).

    Returns:
        The shortened repr.
    """
    if isinstance(value, (bytes, bytearray, memoryview, str)) and len(value) > 60:
        return repr(value[:57])[:60] + "..."
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {short_repr(value)}"


def check_plain(value: Any, path: str, problems: list[Problem], max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Record a problem unless ``value`` is made only of plain types, nested at most ``max_depth``.

    Plain types: None, bool, int, float, str, bytes, lists and str-keyed maps of them.

    Args:
        value: The value to check.
        path: Where it sits, for the problem message.
        problems: Receives the problem, if any.
        max_depth: Deepest allowed nesting of lists/maps.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, path)]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, (list, tuple)):
            children: list[tuple[Any, str]] = [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        elif isinstance(item, dict):
            bad = [k for k in item if not isinstance(k, str)]
            if bad:
                problems.append(Problem("type", where, f"map keys must be strings, got {_describe(bad[0])}"))
                return
            children = [(v, f"{where}[{k!r}]") for k, v in item.items()]
        elif item is None or isinstance(item, (bool, int, float, str, bytes)):
            continue
        else:
            problems.append(Problem("type", where, f"expected a plain value, got {_describe(item)}"))
            return
        if depth >= max_depth:
            problems.append(Problem("type", where, f"nested deeper than {max_depth} levels"))
            return
        stack.extend((child, depth + 1, child_path) for child, child_path in children)


def from_plain(
    hint: Any,
    value: Any,
    problems: list[Problem],
    path: str = "",
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Convert a plain value into what ``hint`` describes, recording every problem.

    Unknown keys of a dataclass map are recorded as ``unknown`` problems and dropped.
    A dataclass whose construction raises (its ``__post_init__`` validation) records a
    ``value`` problem carrying that exception.

    Args:
        hint: Target type (a dataclass, a generic alias, a scalar type, ``Any`` ...).
        value: Plain input (from msgpack or TOML).
        problems: Receives every problem found; the caller decides what is fatal.
        path: Where ``value`` sits, for problem messages.
        max_depth: Nesting cap for ``Any`` values.

    Returns:
        The converted value, or :data:`INVALID` where it could not be converted.
    """
    if hint is Any:
        check_plain(value, path, problems, max_depth)
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _dataclass_from_plain(hint, value, problems, path, max_depth)
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        # `True == 1` in Python; compare type too so a bool never passes for an int literal.
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        problems.append(Problem("type", path, f"must be one of {list(allowed)}, got {_describe(value)}"))
        return INVALID
    if origin in (typing.Union, types.UnionType):
        return _union_from_plain(hint, value, problems, path, max_depth)
    if origin in (list, tuple):
        return _sequence_from_plain(hint, origin, value, problems, path, max_depth)
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            problems.append(Problem("type", path, f"expected a map, got {_describe(value)}"))
            return INVALID
        out = {}
        ok = True
        for k, v in value.items():
            ck = from_plain(key_hint, k, problems, f"{path}[{k!r}]", max_depth=max_depth)
            cv = from_plain(value_hint, v, problems, f"{path}[{k!r}]", max_depth=max_depth)
            ok = ok and ck is not INVALID and cv is not INVALID
            out[ck] = cv
        return out if ok else INVALID
    return _scalar_from_plain(hint, value, problems, path)


def _dataclass_from_plain(cls: type, value: Any, problems: list[Problem], path: str, max_depth: int) -> Any:
    if not isinstance(value, dict):
        problems.append(Problem("type", path, f"expected a map for {cls.__name__}, got {_describe(value)}"))
        return INVALID
    fields = _fields(cls)
    known = {name for name, _, _ in fields}
    for key in value:
        if key not in known:
            problems.append(Problem("unknown", _join(path, str(key)), f"unknown field of {cls.__name__}"))
    kwargs = {}
    ok = True
    for name, hint, required in fields:
        where = _join(path, name)
        if name not in value:
            if required:
                problems.append(Problem("missing", where, f"required field of {cls.__name__} is missing"))
                ok = False
            continue
        converted = from_plain(hint, value[name], problems, where, max_depth=max_depth)
        ok = ok and converted is not INVALID
        kwargs[name] = converted
    if not ok:
        return INVALID
    try:
        return cls(**kwargs)
    except (FedSodaError, ValueError, TypeError) as exc:
        problems.append(Problem("value", path, str(exc), exc))
        return INVALID


def _union_from_plain(hint: Any, value: Any, problems: list[Problem], path: str, max_depth: int) -> Any:
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        problems.append(Problem("type", path, f"must not be null (expected {_type_name(hint)})"))
        return INVALID
    candidates = [a for a in args if a is not type(None)]
    for candidate in candidates:
        trial: list[Problem] = []
        converted = from_plain(candidate, value, trial, path, max_depth=max_depth)
        if converted is not INVALID and not any(p.kind != "unknown" for p in trial):
            problems.extend(trial)
            return converted
        if len(candidates) == 1:
            problems.extend(trial)
            return INVALID
    problems.append(Problem("type", path, f"expected {_type_name(hint)}, got {_describe(value)}"))
    return INVALID


def _sequence_from_plain(
    hint: Any, origin: type, value: Any, problems: list[Problem], path: str, max_depth: int
) -> Any:
    if not isinstance(value, (list, tuple)):
        problems.append(Problem("type", path, f"expected a list, got {_describe(value)}"))
        return INVALID
    args = typing.get_args(hint)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            problems.append(Problem("type", path, f"expected {len(args)} items, got {len(value)}"))
            return INVALID
        item_hints = list(args)
    else:
        item_hints = [args[0] if args else Any] * len(value)
    out = [
        from_plain(h, v, problems, f"{path}[{i}]", max_depth=max_depth)
        for i, (h, v) in enumerate(zip(item_hints, value, strict=True))
    ]
    if any(v is INVALID for v in out):
        return INVALID
    return tuple(out) if origin is tuple else out


def _scalar_from_plain(hint: Any, value: Any, problems: list[Problem], path: str) -> Any:
    if hint is float:
        # msgpack and TOML write 2.0 as an int when the sender had one; accept it, never a bool.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
    elif hint is Path:
        if isinstance(value, str):
            return Path(value)
    elif hint is type(None):
        if value is None:
            return None
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = [m.value for m in hint]
            problems.append(Problem("type", path, f"must be one of {allowed}, got {_describe(value)}"))
            return INVALID
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"from_plain does not support the type hint {hint!r} (at {path or '<root>'})")
    problems.append(Problem("type", path, f"expected {_type_name(hint)}, got {_describe(value)}"))
    return INVALID


def to_plain(obj: Any, bytes_hook: Callable[[bytes], Any] | None = None) -> Any:
    """Turn dataclasses (recursively) into plain maps, lists and scalars.

    Enums become their values and paths strings; bytes stay bytes (no copy).

    Args:
        obj: A dataclass instance or any value made of supported types.
        bytes_hook: If given, every bytes value is replaced by what it returns (called in
            traversal order, which is also the order msgpack packs the result in).

    Returns:
        Plain value suitable for msgpack or TOML.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_plain(getattr(obj, name), bytes_hook) for name, _, _ in _fields(type(obj))}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, bytes_hook) for v in obj]
    if isinstance(obj, dict):
        return {to_plain(k): to_plain(v, bytes_hook) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if bytes_hook is not None and isinstance(obj, bytes):
        return bytes_hook(obj)
    return obj
