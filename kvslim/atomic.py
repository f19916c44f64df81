"""Write a file atomically: a temporary file beside it, renamed over it.

For the measurements kvslim keeps on disk (calibration means, quality tables, kernel
choices): a reader sees the old file or the new one, never half of one, and a store that
cannot be written only costs the next run the measurement (logged at debug level).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("kvslim")


def save(path: Path, write: Callable[[Path], None], what: str) -> bool:
    """write(tmp) then rename tmp over path; False (and nothing left behind) on an OSError."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.debug("%s not saved to %s: %s", what, path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
