"""Small file helpers shared by the harness and the tasks."""
from __future__ import annotations

import os
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` through a temporary file renamed into place: a reader (or a crash) never
    sees half a file, and an earlier file stays whole until the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, path)
