"""Folders written so that a kill at any moment leaves the old complete folder or the new one.

Checkpoints and the token store's caches are written through `atomic_directory`. It needs nothing
but the standard library, so `qwen3 prepare` does not import torch for it.

A checkpoint DIR/NAME is a relative symlink to a sibling folder DIR/.NAME.<id>. A save writes
DIR/.NAME.tmp-<id> while holding an flock on it, fsyncs its files and itself, renames it to
.NAME.<id> and switches the link with os.replace, which is atomic: at every instant NAME is the old
complete checkpoint or the new one, and a kill loses at most the save in progress. The flock tells
the leftovers of killed writers (the kernel drops a lock with its process) from folders that a
live process is writing, whatever the PIDs, so leftovers are removed without disturbing anyone.
A relative link stays valid when the run folder is moved, or copied with its links (cp -r,
rsync -a, tar); a copy that follows them (cp -rL, shutil.copytree) has NAME as a plain folder,
which the next save replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

ID_HEX_DIGITS = 8


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it becomes `path` atomically, else vanishes.

    `path` is then a relative symlink to the new version; the previous version and the leftovers
    of killed writers are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    temporary, lock = locked_temporary(path)
    try:
        try:
            yield temporary
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        publish(temporary, path)
    finally:
        os.close(lock)  # releases the flock


def locked_temporary(path: Path) -> tuple[Path, int]:
    """A new `.NAME.tmp-<id>` folder beside `path`, and the descriptor holding its flock."""
    while True:
        temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(ID_HEX_DIGITS // 2)}")
        try:
            temporary.mkdir()
        except FileExistsError:
            continue
        lock = os.open(temporary, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Between mkdir and flock another process may have taken it for a dead writer's and removed it.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(lock), os.stat(temporary)):
                return temporary, lock
        os.close(lock)


def publish(temporary: Path, path: Path) -> None:
    """Make the complete folder `temporary` the target of `path`, durably, then drop what is stale."""
    sync_tree(temporary)
    version = path.with_name(f".{path.name}.{temporary.name.rsplit('-', 1)[1]}")
    temporary.rename(version)
    # The link is made inside the (locked) version, then moved over `path` by one rename.
    link = version / ".link"
    os.symlink(version.name, link)
    if path.is_dir() and not path.is_symlink():
        # A plain folder (an older or a link-following copy): no rename replaces a folder by a
        # link, so it is moved aside first, locked; a kill just then leaves it to `recover`.
        lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path.rename(moved_aside(path))
            os.replace(link, path)
        finally:
            os.close(lock)
    else:
        os.replace(link, path)
    sync_directory(path.parent)
    remove_stale(path)


def moved_aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> None:
    """Make `path` whole after a kill, and remove the leftovers that no live process is writing.

    Only a kill while a plain `path` folder was being replaced can leave no `path`: its complete
    moved-aside copy is then renamed back.
    """
    path = Path(path)
    old = moved_aside(path)
    if not os.path.lexists(path) and old.is_dir():
        with locked(old) as lock:
            if lock is not None and not os.path.lexists(path):
                old.rename(path)
                sync_directory(path.parent)
    remove_stale(path)


def remove_stale(path: Path) -> None:
    """Remove `path`'s temporaries and versions that are neither its target nor being written."""
    def current(name: str) -> bool:
        if path.is_symlink():
            return os.readlink(path) == name
        return name == moved_aside(path).name and not path.exists()

    for entry in versions(path):
        with locked(entry) as lock:
            if lock is not None and not current(entry.name):
                shutil.rmtree(entry, ignore_errors=True)


def remove_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint `path` with all its versions (a new run replacing a finished one)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    for entry in versions(path):
        with locked(entry) as lock:
            if lock is not None:
                shutil.rmtree(entry, ignore_errors=True)


def versions(path: Path) -> list[Path]:
    """The folders beside `path` that belong to it: versions, temporaries, the moved-aside copy."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(?:tmp-)?[0-9a-f]{{{ID_HEX_DIGITS}}}|old)")
    return [path.parent / name for name in os.listdir(path.parent) if pattern.fullmatch(name)]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[int | None]:
    """The folder's flock, taken without waiting; None when a live process holds it or it is gone."""
    try:
        descriptor: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone already, or not a folder
        descriptor = None
    if descriptor is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            descriptor = None
    try:
        yield descriptor
    finally:
        if descriptor is not None:
            os.close(descriptor)


def sync_tree(folder: Path) -> None:
    """fsync every file below `folder` and the folders themselves, so what a rename publishes is on disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            descriptor = os.open(os.path.join(root, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        sync_directory(Path(root))


def sync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
