"""Files written whole and flushed to disk: a crash, a power cut or a full disk leaves the file before, never half of one."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """write(a temporary path beside path, of its own: processes writing the same file at once do not share it), then
    put it in path's place, readable as any new file (safetensors and temporary files are their owner's alone); on
    failure the temporary file is removed."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        os.chmod(temporary, NEW_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def open_to_all(folder: Path) -> None:
    """Gives every file below folder the mode of a new file: safetensors writes its own files owner-only."""
    for parent, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(parent, name), NEW_FILE_MODE)


def remove(path: Path) -> None:
    """Deletes a folder tree, a file or a link (not what it points to: rmtree refuses a link), if there is one."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def sync_tree(folder: str | os.PathLike) -> None:
    """Flushes every file below folder to disk, and every folder whose entries name them: a file flushed but not its
    entry may be gone after a power cut."""
    for parent, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(parent, name), "rb") as handle:
                os.fsync(handle.fileno())
        sync_folder(parent)


def sync_folder(folder: str | os.PathLike) -> None:
    """Flushes a folder's entries to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def current_umask() -> int:
    """The process's file mode creation mask (reading it means setting it: put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = current_umask()  # read once, on import, before any thread that creates files could meet the moment it is changed
NEW_FILE_MODE = 0o666 & ~UMASK
