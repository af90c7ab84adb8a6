"""`python -m edge_client`: the same command line as the installed console script."""

from edge_client.cli import app

app(prog_name="fedsoda-client")
