"""Entry point for `python -m mmlite`."""

from mmlite.cli import main

raise SystemExit(main())
