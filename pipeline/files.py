"""Output files written whole: a crash or a full disk leaves the file before, never half of one."""

import os
from pathlib import Path
from typing import Callable


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """write(a temporary path beside path), then put it in path's place, readable as any new file (safetensors makes
    its files private); on failure the temporary file is removed."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~UMASK)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file mode creation mask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = current_umask()  # read once, on import, before any thread that creates files could meet the moment it is changed
