"""``python -m actors.app.cli``: the ctxd command line."""

from actors.app.cli import main

raise SystemExit(main())
