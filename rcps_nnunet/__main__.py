"""``python -m rcps_nnunet ...`` is the same as the ``rcps-nnunet`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
