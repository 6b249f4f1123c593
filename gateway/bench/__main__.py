"""`python -m gateway.bench`."""

from gateway.bench.cli import main

main(prog_name="python -m gateway.bench")
