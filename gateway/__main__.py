"""`python -m gateway` runs the `bosun` CLI."""

from gateway.cli import main

main()
