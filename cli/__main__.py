"""`python -m kdarena.cli`: the `kdarena` command."""

from .app import main

main()
