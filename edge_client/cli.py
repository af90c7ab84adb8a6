"""`fedsoda-client`: the edge client's command line.

Only this module talks to the terminal: library code logs and raises
:class:`shared.errors.FedSodaError`, which is turned into an exit code here.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="fedsoda edge client: probe hardware, join a run, train QLoRA adapters.")


@app.callback()
def main() -> None:
    """fedsoda edge client (a callback keeps Typer from collapsing a one-command app)."""
