"""``python -m structprune``: the command line."""

from structprune.front.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
