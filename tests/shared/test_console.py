"""What both command lines share (shared.console): the logging set-up."""

from __future__ import annotations

import logging

import pytest

from shared.console import setup_logging

pytestmark = pytest.mark.usefixtures("restore_logging")

KERNELS_HINT = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
    "`pip install kernels` and the kernels >= 0.11.1"
)


def _record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def _shown(record: logging.LogRecord) -> bool:
    (handler,) = logging.getLogger().handlers
    return bool(handler.filter(record))


@pytest.mark.parametrize("verbose", [False, True])
def test_the_bitsandbytes_kernels_hint_is_dropped_and_other_records_are_not(verbose: bool) -> None:
    setup_logging(verbose)
    assert not _shown(_record("bitsandbytes.backends.cpu.ops", KERNELS_HINT, ImportError("No module named 'kernels'")))
    assert _shown(_record("bitsandbytes.backends.cpu.ops", "some other bitsandbytes warning"))
    assert _shown(_record("edge_client.runner", KERNELS_HINT, "the same text from elsewhere"))
    assert _shown(_record("shared.subllm", "loaded sub-LLM %s", "smol", level=logging.INFO))


def test_a_console_that_is_not_a_terminal_is_wide_enough_for_the_report_tables() -> None:
    from rich.console import Console
    from rich.table import Table

    from shared.console import LOG_WIDTH, console_width

    assert console_width(True, {}) is None  # a terminal: its own width
    assert console_width(False, {"COLUMNS": "132"}) is None  # rich reads COLUMNS itself
    assert console_width(False, {}) == LOG_WIDTH
    # The run report's client table (9 columns, a long client id) fits whole at that width.
    table = Table()
    for column in ("client", "tier", "rounds", "MiB down", "MiB up", "peak GiB", "budget", "train s", "loss"):
        table.add_column(column)
    table.add_row("jetson-orin-nano-kitchen-042", "L18", "3", "62.7", "3.21", "1.08", "7.4", "312", "2.31>1.87")
    out = Console(width=console_width(False, {}), record=True, file=open("/dev/null", "w"))
    out.print(table)
    text = out.export_text()
    assert "jetson-orin-nano-kitchen-042" in text and "2.31>1.87" in text and "…" not in text
    narrow = Console(width=80, record=True, file=open("/dev/null", "w"))
    narrow.print(table)
    assert "…" in narrow.export_text() or "jetson-orin-nano-kitchen-042" not in narrow.export_text()
