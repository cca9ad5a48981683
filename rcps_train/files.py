"""Files that are whole or absent: text written to a temporary file, flushed to disk and renamed over the target,
so a kill never leaves half a file; JSON read back with a torn file counted as not written. Standard library only
(the preparation workers import it without torch)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable, mode: str) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` (opened with ``mode``), flush it to disk, then
    rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode, **({"newline": ""} if "b" not in mode else {})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a JSON, CSV or TOML file so that a reader sees the old or the new content, never half of it."""
    replace_atomically(path, lambda f: f.write(text), "w")


def write_csv_atomic(path: Path, fields: list[str], rows: list[dict]) -> None:
    """A CSV file with a header row, written with :func:`write_text_atomic`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``, or None when the file is absent, torn (a kill while an older version wrote
    it in place) or not an object: such a file counts as not written."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
