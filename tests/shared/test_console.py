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
