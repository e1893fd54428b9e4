"""Writing result files so that a crash never leaves half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path, content: Any, *, indent: int = 1) -> Path:
    """`content` as JSON at `path`, written to a hidden file beside it and renamed over it:
    readers see the old file or the new one, never a truncated one (long jobs rewrite their
    results after every episode or row). Objects JSON cannot hold are written as `str()`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=indent, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)   # mkstemp makes it private to us; results are for everyone
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
