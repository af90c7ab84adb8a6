"""What both command lines share: logging to a rich console, broker addresses, exit codes.

Library code never prints; the two ``cli.py`` modules call :func:`run_command`, which turns
any :class:`~shared.errors.FedSodaError` into a red one-line message and the error's exit
code, so a user sees what went wrong and a script can tell failures apart.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from shared.errors import ConfigError, FedSodaError

T = TypeVar("T")

#: Columns of the console when stderr is not a terminal (a log file, CI, a pipe). Rich would
#: assume 80 there and cut the report tables and wrap long lines; a log has no width to fit.
LOG_WIDTH = 200


def console_width(is_terminal: bool, environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    """The console's width: the terminal's own (None), ``COLUMNS`` if set, else :data:`LOG_WIDTH`."""
    if is_terminal or environ.get("COLUMNS"):
        return None
    return LOG_WIDTH


#: Everything human-readable goes to stderr, so ``--json`` output on stdout stays clean.
console = Console(stderr=True, width=console_width(sys.stderr.isatty()))


#: Start of the WARNING bitsandbytes logs when imported on a CPU with AVX512_BF16 without the
#: optional ``kernels`` package. It is harmless: bitsandbytes falls back to its own kernel, for
#: an inference layout fedsoda switches off anyway (``shared.subllm.disable_cpu_4bit_repacking``).
#: And its advice, ``pip install kernels``, is wrong for an offline client: kernels fetches
#: code from the Hugging Face hub at run time.
_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_kernels_hint(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("bitsandbytes") and str(record.msg).startswith(_KERNELS_HINT))


def setup_logging(verbose: bool = False) -> None:
    """Send log records to the rich console (INFO, or DEBUG with ``verbose``).

    Args:
        verbose: Show debug records too.
    """
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=True)
    # On the handler, not on bitsandbytes' logger: a logger's filter misses records its children log.
    handler.addFilter(_not_kernels_hint)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[handler],
        force=True,
    )
    # Third-party libraries are chatty at INFO; keep their warnings only.
    for noisy in ("transformers", "accelerate", "peft", "bitsandbytes", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Their deprecation notices and per-load progress bars are about their internals, not
    # about anything a user of fedsoda can act on; our own progress is drawn with rich.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a dependency; this only guards partial installs
        pass


def run_command(action: Callable[[], T]) -> T:
    """Run a CLI action; a FedSodaError becomes a message and its exit code.

    Args:
        action: The command body.

    Returns:
        What ``action`` returned.

    Raises:
        typer.Exit: With the error's exit code, after printing what went wrong.
    """
    try:
        return action()
    except FedSodaError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)  # unwrapped: paths stay copyable
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def parse_broker_address(address: str, default_port: int = 1883) -> tuple[str, int]:
    """Split ``HOST[:PORT]`` into host and port.

    Args:
        address: e.g. ``"broker.local:1883"``, ``"127.0.0.1"`` or ``"[::1]:8883"``.
        default_port: Port when none is given.

    Returns:
        ``(host, port)``.

    Raises:
        ConfigError: The port is not a number in 1-65535 or the host is empty.
    """
    if address.startswith("["):  # [IPv6]:port
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif address.count(":") == 1:
        host, port_text = address.split(":")
    else:  # a bare host name or a bare IPv6 address
        host, port_text = address, ""
    if not host:
        raise ConfigError(f"broker address {address!r} has no host (use HOST:PORT)")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"broker address {address!r}: port {port_text!r} is not a number in 1-65535")
    return host, int(port_text)
