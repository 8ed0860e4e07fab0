"""Where a store lives: a local folder or an fsspec URL (s3://, gs://, memory://), and the few file
operations the store needs beyond zarr."""

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from pipeline.errors import CrosscodersError
from pipeline.files import remove, sync_folder, sync_tree


class Location:
    """A folder on some file system, named by a local path or a URL."""

    def __init__(self, url: str | os.PathLike):
        text = os.fspath(url)
        if "://" in text:
            try:
                self.fs, root = fsspec.core.url_to_fs(text)
            except (ImportError, ValueError, OSError) as error:  # s3:// without s3fs, an FTP server that refuses, no JVM for hdfs
                raise CrosscodersError(f"cannot open {text}: {error}") from None
        else:  # a local path, whatever it holds: fsspec reads "a::b" as a chain of file systems
            self.fs, root = LocalFileSystem(), os.path.expanduser(text)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        self.url = self.root if self.is_local else text.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def path(self, *parts: str) -> str:
        """The file system path of a name inside this folder."""
        return "/".join([self.root, *parts])

    def zarr_store(self, read_only: bool = False):
        """A zarr store rooted at this folder."""
        if self.is_local:
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, read_only=read_only)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> dict:
        """A JSON file's content; OSError if it is missing, ValueError if it is not JSON."""
        with self.fs.open(self.path(*parts), "rb") as handle:
            return json.loads(handle.read())

    def write_file(self, pieces: list[bytes], *parts: str) -> None:
        """Writes a file inside this folder from its pieces, making the local folders that hold it."""
        path = self.path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as file:
            for piece in pieces:
                file.write(piece)

    def entries(self) -> list[str]:
        """Names of the files and folders directly inside this folder (empty if it does not exist)."""
        if not self.fs.isdir(self.root):
            return []
        return sorted(os.path.basename(entry.rstrip("/")) for entry in self.fs.ls(self.root, detail=False))

    def files(self, *parts: str) -> list[str]:
        """Every file below a subfolder, as paths relative to this folder, in one listing."""
        prefix = self.path(*parts)
        if not self.fs.isdir(prefix):
            return []
        if self.is_local:  # into linked folders too (a shard linked from another disk), which fsspec's find leaves out
            return sorted(path[len(self.root) + 1 :] for path in _local_files(prefix))  # prefix starts with root + "/"
        return [path[len(self.root) + 1 :] for path in self.fs.find(prefix)]

    def remove(self, *parts: str) -> None:
        """Deletes a subfolder and everything in it, if it exists (a linked one: the link, not what it points to)."""
        if self.is_local:
            remove(Path(self.path(*parts)))
        elif self.fs.exists(self.path(*parts)):
            self.fs.rm(self.path(*parts), recursive=True)

    def make_durable(self, *parts: str) -> None:
        """Flushes a local subfolder's files to disk, and the folders holding them, up to this one, whose entries name
        them: a file flushed but not its entry may be gone after a power cut (object stores persist each write)."""
        if not self.is_local:
            return
        sync_tree(self.path(*parts))
        sync_folder(self.root)

    def free_bytes(self) -> int | None:
        """Free space under a local folder (or its nearest existing parent); None for object stores."""
        if not self.is_local:
            return None
        folder = self.root
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        return shutil.disk_usage(folder).free


def _local_files(folder: str) -> Iterator[str]:
    """Every file below a local folder, through linked folders; a link that leads to a folder already listed (a loop,
    which would never end, or a second path to the same files) is a CrosscodersError."""
    listed = {}  # (device, inode) -> the folder listed: a stat, where realpath took a third of a large store's opening
    for parent, _, names in os.walk(folder, followlinks=True):
        try:
            where = os.stat(parent)
        except FileNotFoundError:  # removed since it was listed: an unfinished shard that a starting cache-acts cleared
            continue
        seen = listed.setdefault((where.st_dev, where.st_ino), parent)
        if seen != parent and os.path.realpath(seen) == os.path.realpath(parent):  # not a removed folder's inode reused
            raise CrosscodersError(f"{parent} leads to {os.path.realpath(parent)}, a folder already listed there: a link "
                                   "loops or doubles the store's files; remove the link")
        yield from (os.path.join(parent, name) for name in names)


@contextmanager
def exclusive_lock(location: Location, busy: str) -> Iterator[None]:
    """Holds an exclusive flock on a local folder, made if missing; CrosscodersError(busy) while another process holds
    it. The folders made for it are removed, still under the lock, where the job leaves them empty (refused before it
    wrote anything); a job refused the lock removes nothing. Object stores and file systems without flock go unlocked."""
    if not location.is_local:
        yield
        return
    root = Path(location.root)
    made = [folder for folder in (root, *root.parents) if not folder.exists()]  # deepest first
    descriptor = _locked_folder(location.root, busy)
    try:
        yield
    finally:
        if descriptor is not None:
            for folder in made:
                try:
                    folder.rmdir()  # an empty folder only
                except OSError:
                    break
            os.close(descriptor)


def _locked_folder(root: str, busy: str) -> int | None:
    """A descriptor of the folder at root, made if missing, holding its exclusive flock; None where it cannot be made
    or locked (the caller's own checks say why). A folder removed or replaced between its opening and its lock (a
    job that held it deleting it empty) is not the one root names any more, so the one there now is locked instead."""
    while True:
        try:
            os.makedirs(root, exist_ok=True)
            descriptor = os.open(root, os.O_RDONLY)
        except OSError:  # not a folder that can be made
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise CrosscodersError(busy) from None
        except OSError:  # e.g. NFS, where an exclusive flock needs a file open for writing
            return descriptor
        try:
            now = os.stat(root)
        except OSError:
            now = None
        held = os.fstat(descriptor)
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return descriptor
        os.close(descriptor)
