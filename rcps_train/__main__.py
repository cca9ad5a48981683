"""``python -m rcps_train ...`` is the same as the ``rcps-train`` console script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
