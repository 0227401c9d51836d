"""`python -m opsd_cli` runs the `opsd` command."""

from opsd_cli import main

main()
