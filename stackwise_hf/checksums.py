"""sha256 digests of the files of a rack: computed when a rack is written, compared when it is read.

The digest is the one the Hub uses for large (LFS) files, so a file's recorded digest and its Hub
object id agree. Files are hashed in a thread pool (hashlib releases the GIL while hashing large
buffers) while the caller goes on reading tensors; `Verifier.check` waits for the digests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import CorruptFileError

_CHUNK = 1 << 20
_WORKERS = min(8, os.cpu_count() or 1)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: Mapping[str, str]) -> dict[str, str]:
    """{name: sha256} for {name: local path}, hashed in threads."""
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = {name: pool.submit(sha256_file, path) for name, path in paths.items()}
        return {name: futures[name].result() for name in sorted(futures)}


class Verifier:
    """A resolver (file name -> local path) that hashes, in the background, every file it hands out for
    which a digest is recorded; `check()` raises CorruptFileError naming the first file whose content
    differs. With `expected=None` nothing is hashed and `check()` passes."""

    def __init__(self, resolve: Callable[[str], str], expected: Mapping[str, str] | None, where,
                 recorded_in: str = "the index"):
        self._resolve, self.expected, self.where, self.recorded_in = resolve, expected, where, recorded_in
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS) if expected else None
        self._pending: dict[str, tuple[str, Future]] = {}

    def __call__(self, name: str) -> str:
        path = self._resolve(name)
        if self.expected and name in self.expected and name not in self._pending:
            if self._pool is not None:
                self._pending[name] = (path, self._pool.submit(sha256_file, path))
            else:  # after `close`: verified at once
                self._compare(name, path, sha256_file(path))
        return path

    def check(self) -> int:
        """Waits for the digests of the files handed out so far; returns how many were verified."""
        for name, (path, future) in sorted(self._pending.items()):
            self._compare(name, path, future.result())
        return len(self._pending)

    def _compare(self, name: str, path: str, found: str) -> None:
        if found != self.expected[name]:
            raise CorruptFileError(
                f"{path}: sha256 {found} differs from the {self.expected[name]} recorded in {self.recorded_in} when "
                f"{self.where} was saved: the file, or {self.recorded_in}, is damaged or was replaced."
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
