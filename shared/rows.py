"""Reading a data file of rows: JSONL or CSV, each row a dict, each with its line number.

The client's private data, the coordinator's test data and ``simulate --data`` are all files
like this. Every problem is a :class:`~shared.errors.DataError` that names the file and, for
a bad row, its line, so a user can open the file at the place that is wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from shared.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)

Row = tuple[int, dict[str, Any]]
"""A row and the line it starts on."""


def read_rows(path: str | Path) -> list[Row]:
    """Read a ``.jsonl``/``.ndjson`` file (one JSON object per line, blank lines skipped) or a
    ``.csv`` file with a header row (blank rows skipped).

    Args:
        path: The file.

    Returns:
        ``(line number, row)`` pairs in file order.

    Raises:
        DataError: Missing, unreadable, not UTF-8, an unsupported type, no rows, or a bad row
            (named by its line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (pass a .jsonl or .csv file)")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = read_jsonl_rows(path)
    elif suffix in CSV_SUFFIXES:
        rows = _read_csv(path)
    else:
        raise DataError(f"data file {path} has an unsupported type {suffix!r}: use .jsonl or .csv")
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def read_jsonl_rows(path: Path) -> list[Row]:
    """Read a JSONL file: one JSON object per line, blank lines skipped.

    Args:
        path: The file.

    Returns:
        ``(line number, object)`` pairs in file order.

    Raises:
        DataError: Unreadable, not UTF-8, or a line that is not a JSON object (named by line).
    """
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, restkey="\0extra", restval=None)
            if reader.fieldnames is None:
                raise DataError(f"{path}: the file is empty (a CSV file needs a header row and data rows)")
            width = len(reader.fieldnames)
            line = 1
            for row in reader:
                # A quoted field may span lines, so the row starts after the previous one ended.
                start, line = line + 1, reader.line_num
                if "\0extra" in row or any(v is None for v in row.values()):
                    got = width + len(row.get("\0extra", [])) - sum(v is None for v in row.values())
                    raise DataError(f"{path}:{start}: row has {got} fields but the header has {width}")
                if not any((v or "").strip() for v in row.values()):
                    continue
                rows.append((start, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    return rows
