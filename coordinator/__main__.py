"""`python -m coordinator`: the same command line as the installed console script."""

from coordinator.cli import app

app(prog_name="fedsoda-coordinator")
