"""`fedsoda-coordinator`: the coordinator's command line.

Only this module talks to the terminal: library code logs and raises
:class:`shared.errors.FedSodaError`, which :func:`run_cli_command` turns into an exit code.
"""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="fedsoda coordinator: prune, align, package and serve federated rounds.")


@app.callback()
def main() -> None:
    """fedsoda coordinator (a callback keeps Typer from collapsing a one-command app)."""
