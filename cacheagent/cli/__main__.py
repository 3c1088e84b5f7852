"""``python -m cacheagent.cli``."""

from __future__ import annotations

from cacheagent.cli.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
