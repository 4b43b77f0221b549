"""Atomic replacement of a directory, so that any kill leaves the old or the new version complete.

A save writes the complete new version into an empty sibling directory (`.<name>.stackwise-new-*`),
then swaps it with the old one in one step: Linux `renameat2(RENAME_EXCHANGE)`, which neither the
standard library nor huggingface_hub offers (hence ctypes). Where the exchange is not available, the old
version is first renamed aside (`.<name>.stackwise-old-*`) and the new one renamed into place; a kill
between those two renames leaves the old version aside, and the next save of the path puts it back
before it starts. Either way, the next save removes what a killed save left behind.

Files of the old version that are not part of what is being written (a tokenizer saved beside a rack,
a user's notes) are carried into the new version (hard links where possible). One writer per path.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .layout import NEW_DIR_MARK, OLD_DIR_MARK

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def replacing(directory, carry: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yields an empty temporary directory beside `directory`; when the block completes, its content
    becomes `directory` in one atomic step (a new directory is simply renamed into place).

    Args:
        directory: the directory to create or replace.
        carry: called with each file's POSIX path relative to the old `directory`; the files for which
            it returns True are kept in the new version unless the block wrote a file of that name.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(directory):
        raise NotADirectoryError(f"{directory}: expected a directory to save into, found a file.")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(directory)
    tmp = tempfile.mkdtemp(prefix=f".{name}{NEW_DIR_MARK}", dir=parent)
    try:
        yield tmp
        if os.path.isdir(directory):
            os.chmod(tmp, stat.S_IMODE(os.stat(directory).st_mode))
            if carry is not None:
                _carry_over(directory, tmp, carry)
            _swap(tmp, directory)
            shutil.rmtree(tmp)  # now the old version
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(directory) -> list[str]:
    """Removes what killed saves of `directory` left beside it; an old version renamed aside while the
    path is empty is put back first. Returns the removed paths."""
    directory = os.path.abspath(os.fspath(directory))
    parent, name = os.path.split(directory)
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}{OLD_DIR_MARK}") and not os.path.exists(directory):
            os.rename(path, directory)
            logger.warning("%s: restored the version a killed save had moved aside (%s).", directory, entry)
        elif entry.startswith((f".{name}{NEW_DIR_MARK}", f".{name}{OLD_DIR_MARK}")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("%s: removed %d leftover(s) of killed saves: %s", directory, len(removed), removed)
    return removed


def _carry_over(old: str, new: str, carry: Callable[[str], bool]) -> None:
    for root, _, files in os.walk(old):
        for filename in files:
            source = os.path.join(root, filename)
            rel = os.path.relpath(source, old).replace(os.sep, "/")
            target = os.path.join(new, rel)
            if os.path.lexists(target) or os.path.islink(source) or not carry(rel):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # another filesystem, or no hard links there
                shutil.copy2(source, target)


def _swap(new: str, current: str) -> None:
    """Exchanges the two directories' names in one step; falls back to two renames."""
    if _exchange(new, current):
        return
    parent, name = os.path.split(current)
    aside = tempfile.mkdtemp(prefix=f".{name}{OLD_DIR_MARK}", dir=parent)
    os.rmdir(aside)
    os.rename(current, aside)
    os.rename(new, current)
    os.rename(aside, new)  # so the caller removes the old version under the temporary name


def _exchange(a: str, b: str) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without renameat2
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # a kernel or filesystem without it
        return False
    raise OSError(err, f"cannot swap {a} into {b}: {os.strerror(err)}")
