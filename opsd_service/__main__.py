"""`python -m opsd_service ...`: the `opsd` command, used by `opsd up` to start its children."""

from opsd_cli import main

if __name__ == "__main__":
    main()
