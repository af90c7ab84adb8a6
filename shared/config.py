"""Strict TOML -> frozen dataclasses, with environment and command-line layers.

Precedence, lowest first: the dataclass defaults < the TOML file < ``FEDSODA_*``
environment variables < explicit overrides (the CLI's flags).

Environment convention: ``FEDSODA_`` + the field's dotted path in upper case with ``__``
(two underscores) between levels; one underscore stays part of a name. So
``rounds.local_steps`` is ``FEDSODA_ROUNDS__LOCAL_STEPS`` and a top-level ``seed`` is
``FEDSODA_SEED``. Values are read as the field's type: numbers, booleans
(``true/false/1/0/yes/no/on/off``), ``none``/empty for optional fields, lists as a TOML
array (``[1, 2]``) or comma-separated (``q_proj,v_proj``), maps as a TOML inline table.
Variables that name no field are ignored, because ``FEDSODA_`` is also used by settings
that are not config fields (e.g. ``FEDSODA_CACHE``).

Overrides are a mapping from dotted paths to values (``{"rounds.local_steps": 5}``);
``None`` means "flag not given" and is skipped, strings are read like environment values,
and an unknown path is an error.

Strictness: an unknown key in the file, a missing required field, a wrong type or a value
the dataclass's ``__post_init__`` refuses is a problem; every problem from every layer is
collected and raised together in one :class:`~shared.errors.ConfigError`, each naming its
dotted path and where the value came from.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from shared.errors import ConfigError
from shared.typed import INVALID, Problem, field_hints, from_plain, to_plain

T = TypeVar("T")

ENV_PREFIX = "FEDSODA_"
"""Prefix of environment variables read by :func:`load_config`."""

ENV_NESTING = "__"
"""Separator between nesting levels in environment variable names."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """fedsoda's cache folder: ``$FEDSODA_CACHE`` or ``~/.cache/fedsoda``.

    Holds the converted bundled model, the evals wheel, and each client's chunk cache and
    resume state (``clients/<id>``).
    """
    return Path(os.environ.get("FEDSODA_CACHE", Path.home() / ".cache" / "fedsoda"))


def env_var_name(dotted: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable that sets a field.

    Args:
        dotted: Dotted field path, e.g. ``rounds.local_steps``.
        prefix: Variable prefix.

    Returns:
        e.g. ``FEDSODA_ROUNDS__LOCAL_STEPS``.
    """
    return prefix + ENV_NESTING.join(part.upper() for part in dotted.split("."))


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, type hint) of every non-dataclass field, recursing into nested dataclasses.

    Args:
        cls: A dataclass type.
        prefix: Path prefix for recursion.

    Yields:
        Pairs of dotted path and hint.
    """
    for name, hint in field_hints(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        inner = _unwrap_optional(hint)
        if _is_dataclass_type(inner):
            yield from leaf_fields(inner, path)
        else:
            yield path, hint


def parse_text(hint: Any, text: str) -> Any:
    """Read a string (environment variable or flag) as a value of ``hint``'s type.

    Args:
        hint: The field's type hint.
        text: The raw string.

    Returns:
        A plain value for :func:`shared.typed.from_plain` to check.

    Raises:
        ValueError: The text cannot be read as that type.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args and text.strip().lower() in ("", "none", "null"):
            return None
        return parse_text(_unwrap_optional(hint), text)
    if hint is str or hint is Path:
        return text
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"cannot read {text!r} as a boolean (use true/false)")
    if hint is int:
        return int(text.strip())
    if hint is float:
        return float(text.strip())
    if origin is Literal:
        values = typing.get_args(hint)
        for value in values:
            if str(value) == text.strip():
                return value
        raise ValueError(f"{text!r} is not one of {list(values)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return text.strip()
    if origin in (list, tuple):
        stripped = text.strip()
        if stripped.startswith("["):
            return _toml_value(stripped)
        item_hint = typing.get_args(hint)[0] if typing.get_args(hint) else str
        return [parse_text(item_hint, item.strip()) for item in stripped.split(",") if item.strip()]
    if origin is dict or _is_dataclass_type(hint):
        return _toml_value(text.strip())
    if hint is Any:
        return text
    raise ValueError(f"cannot read a {hint} from text")


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{text!r} is not a TOML value ({exc})") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> bool:
    """Put ``value`` at ``dotted`` inside nested dicts; False if a non-table is in the way."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return False
        node = child
    node[leaf] = value
    return True


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file.

    Args:
        path: The file.

    Returns:
        Its content as plain dicts.

    Raises:
        ConfigError: Missing, unreadable or not valid TOML (with the parser's line and column).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env_prefix: str = ENV_PREFIX,
) -> T:
    """Build a config dataclass from defaults, a TOML file, the environment and overrides.

    Args:
        cls: The (frozen) config dataclass; nested dataclasses become TOML tables.
        path: TOML file, or None for defaults + environment + overrides only.
        env: Environment to read (default ``os.environ``).
        overrides: Dotted path -> value (CLI flags); None values are skipped.
        env_prefix: Environment variable prefix.

    Returns:
        The config instance.

    Raises:
        ConfigError: Every problem found, one per line, each with its dotted path and source.
    """
    environ = os.environ if env is None else env
    # Start from the default instance so a file (or a flag) may set one field of a nested
    # table whose dataclass has required fields (e.g. only training.local_steps).
    data: dict[str, Any] = _merge(_defaults_as_plain(cls), read_toml(path) if path is not None else {})
    origin = {"": f"file {path}" if path is not None else "defaults"}
    errors: list[str] = []
    leaves = dict(leaf_fields(cls))

    for dotted, hint in leaves.items():
        name = env_var_name(dotted, env_prefix)
        if name in environ:
            _apply_text(data, dotted, hint, environ[name], name, origin, errors)

    for dotted, value in (overrides or {}).items():
        source = f"override {dotted}"
        if value is None:
            continue
        if dotted not in leaves:
            errors.append(f"{dotted}: unknown option (known: {', '.join(sorted(leaves))})")
        elif isinstance(value, str) and leaves[dotted] is not str:
            _apply_text(data, dotted, leaves[dotted], value, source, origin, errors)
        elif not _set_path(data, dotted, value):
            errors.append(f"{dotted}: cannot set it from {source}: a parent is not a table")
        else:
            origin[dotted] = source

    problems: list[Problem] = []
    result = from_plain(cls, data, problems)
    # A config class may name keys it used to have (``RENAMED_KEYS = {"old.path": "what now"}``),
    # so a file written for an older version gets told where its setting went.
    renamed: Mapping[str, str] = getattr(cls, "RENAMED_KEYS", {})
    for p in problems:
        message = "unknown key (not a field of this config)" if p.kind == "unknown" else p.message
        if p.kind == "unknown" and p.path in renamed:
            message += f"; {renamed[p.path]}"
        errors.append(f"{p.path or '<root>'}: {message} [{_source_of(p.path, origin)}]")
    if errors or result is INVALID:
        raise ConfigError(
            f"{len(errors)} problem(s) in the {cls.__name__} configuration:\n" + "\n".join(f"  - {e}" for e in errors)
        )
    return result


def _defaults_as_plain(cls: type) -> dict[str, Any]:
    """The default instance of ``cls`` as plain dicts, or {} when it has required fields."""
    try:
        return to_plain(cls())
    except (TypeError, ConfigError):
        return {}


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``top`` over ``base`` (tables merge key by key; other values replace)."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_text(
    data: dict[str, Any], dotted: str, hint: Any, text: str, source: str, origin: dict[str, str], errors: list[str]
) -> None:
    try:
        value = parse_text(hint, text)
    except ValueError as exc:
        errors.append(f"{dotted}: {exc} [{source}]")
        return
    if _set_path(data, dotted, value):
        origin[dotted] = source
    else:
        errors.append(f"{dotted}: cannot set it from {source}: a parent is not a table")


def _source_of(path: str, origin: dict[str, str]) -> str:
    """Where the value at ``path`` came from: its own or its descendants' sources, else its closest ancestor's."""
    base_path = path.split("[")[0]
    below = [src for key, src in origin.items() if key and (key == base_path or key.startswith(base_path + "."))]
    if below and base_path:
        return ", ".join(dict.fromkeys(below))
    candidate = path
    while candidate:
        base = candidate.split("[")[0]
        if base in origin:
            return origin[base]
        if "." not in base:
            break
        candidate = base.rsplit(".", 1)[0]
    return origin[""]
