"""The read side of racks on disk and on the Hub: a resolver maps a file name inside a rack (a local
directory or a Hub repo at a revision) to a local path, so every reader reads both the same way.

Hub files are fetched one at a time through the HF cache (reading one stack fetches only that
stack's shards), and each is verified: `huggingface_hub` checks a download's size against the
server's; on top of that every file read through `hub_resolver` is hashed and compared with the id
the Hub stored it under (sha256 for LFS files, the git blob id otherwise), which also catches a
cache file damaged after download. Errors say what was asked of which repo: FileNotFoundError for a
missing repo, revision or file; HubConnectionError for an unreachable Hub; HubError otherwise.

Training checkpoints pushed to the Hub are downloaded whole (`download_checkpoint`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager

from huggingface_hub import (
    _CACHED_NO_EXIST,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CorruptFileError, MissingFileError, StackWiseError, UnsafePathError
from .layout import CARD_NAME, SAFE_NAME

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

# A resolver maps a file name inside a rack directory (or Hub repo) to a local path; FileNotFoundError
# when there is no such file.
Resolver = Callable[[str], str]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID = re.compile(r"^[0-9a-f]{40}$")
NETWORK_ERRORS = (TransportError, OfflineModeIsEnabled, ConnectionError)


class HubError(StackWiseError, OSError):
    """A Hub request failed. The message says what was attempted and in what state the remote repo is."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub could not be reached (network down, server gone, `HF_HUB_OFFLINE=1`)."""


# Local directories ---------------------------------------------------------------------------------


def check_relative_name(filename: str, where) -> None:
    """UnsafePathError unless `filename` is a relative POSIX path of plain components (`layout.SAFE_NAME`)."""
    if not isinstance(filename, str) or not all(SAFE_NAME.match(part) for part in filename.split("/")):
        raise UnsafePathError(f"{where}: {filename!r} is not a file name inside the folder (plain components "
                              f"matching {SAFE_NAME.pattern}; no absolute path, no '..').")


def local_resolver(directory: str | os.PathLike) -> Resolver:
    """A resolver for a local directory; raises FileNotFoundError naming the missing file, and
    UnsafePathError for a name, or a symbolic link, that leads outside the directory."""
    root = os.path.realpath(directory)

    def resolve(filename: str) -> str:
        check_relative_name(filename, directory)
        path = os.path.join(directory, filename)
        real = os.path.realpath(path)
        if os.path.commonpath([real, root]) != root:
            raise UnsafePathError(f"{path}: leads outside {directory} (to {real}) through a symbolic link.")
        if not os.path.isfile(real):
            raise MissingFileError(f"{path}: file not found.")
        return path

    return resolve


def resolver_for(path: str | os.PathLike, **hub_kwargs) -> Resolver:
    """A resolver for a local rack/stack directory, or for a Hub repo id (`revision`, `token`, ...)."""
    path = os.fspath(path)
    hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if os.path.isdir(path):
        if hub_kwargs:
            raise ValueError(f"{path} is a local directory; Hub arguments {sorted(hub_kwargs)} do not apply.")
        return local_resolver(path)
    if os.path.exists(path):
        raise NotADirectoryError(f"{path}: expected a rack or stack directory, found a file.")
    if os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: no such directory (and not a Hub repo id of the form 'namespace/name').")
    return hub_resolver(path, **hub_kwargs)


def has_file(resolve: Resolver, filename: str) -> bool:
    """True when the directory or repo behind `resolve` has `filename` (fetching it if it is remote)."""
    try:
        resolve(filename)
    except FileNotFoundError:
        return False
    return True


# The Hub -------------------------------------------------------------------------------------------


def is_repo_id(path: str | os.PathLike) -> bool:
    """True for "namespace/name" that is not an existing local path."""
    path = os.fspath(path)
    return not os.path.exists(path) and bool(_REPO_ID.match(path)) and not path.startswith(".")


def hub_resolver(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | None = None, repo_type: str | None = None, subfolder: str | None = None,
                 local_files_only: bool = False, force_download: bool = False) -> Resolver:
    """A resolver that downloads one file of `repo_id` at `revision` on demand (through the HF cache),
    so reading one stack fetches only that stack's shards. Every file is verified (`verify_download`).

    Errors: FileNotFoundError for a missing repo, revision or file; HubConnectionError when the Hub
    cannot be reached and the file is not cached; HubError for other refusals; CorruptFileError for a
    file whose content does not hash to the id the Hub stored it under.
    """
    where = f"{repo_id}@{revision or 'main'}"
    reached = False

    def resolve(filename: str) -> str:
        nonlocal reached
        check_relative_name(filename, where)
        with hub_errors(where, filename=filename, local_files_only=local_files_only):
            if not (reached or local_files_only or constants.HF_HUB_OFFLINE):
                reached = _probe(repo_id, filename, subfolder, revision, token, cache_dir, repo_type, force_download)
            path = hf_hub_download(
                repo_id, filename, subfolder=subfolder or None, revision=revision, token=token,
                cache_dir=cache_dir, repo_type=repo_type, local_files_only=local_files_only,
                force_download=force_download,
            )
        verify_download(path, f"{where}: {filename}")
        return path

    return resolve


def _probe(repo_id, filename, subfolder, revision, token, cache_dir, repo_type, force_download) -> bool:
    """One HEAD request without retries before huggingface_hub's own, so that a Hub that cannot be
    reached fails at once: for a file that is not cached, huggingface_hub retries its HEAD with backoff
    for ~20 s. A file the cache knows is absent from the repo is then reported absent (FileNotFoundError),
    as transformers reads the cache offline. Skipped for cached files (huggingface_hub falls back to them
    at once). Returns True once the Hub answered, so later files skip the probe."""
    path = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
    cached = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=revision, repo_type=repo_type)
    if isinstance(cached, str) and not force_download:
        return False
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, path, repo_type=repo_type, revision=revision), token=token,
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except NETWORK_ERRORS as err:
        if cached is _CACHED_NO_EXIST:
            raise FileNotFoundError(f"{repo_id}@{revision or 'main'}: no file {path!r} in the repo (as cached; "
                                    f"the Hub cannot be reached).") from err
        raise LocalEntryNotFoundError(f"{path} is not cached and the Hub cannot be reached") from err
    except HfHubHTTPError:
        pass  # not found, refused...: hf_hub_download meets the same answer and raises it
    return True


@contextmanager
def hub_errors(where: str, *, filename: str | None = None, action: str | None = None, local_files_only: bool = False):
    """Turns huggingface_hub's errors into ones that say what was asked of which repo: FileNotFoundError
    for a missing repo, revision or file; HubConnectionError for an unreachable Hub; HubError otherwise."""
    what = f"{filename!r} of {where}" if filename else where
    action = action or f"fetching {what}"
    try:
        yield
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{where.split('@')[0]}: no such repo on the Hub at {constants.ENDPOINT} (or the token cannot see it)."
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: no such revision on the Hub at {constants.ENDPOINT}.") from err
    except LocalEntryNotFoundError as err:
        cause = err.__cause__ or err.__context__
        if local_files_only or constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{what}: not in the local HF cache, and downloads are off.") from err
        error_cls = HubConnectionError if isinstance(cause, NETWORK_ERRORS) else HubError
        raise error_cls(
            f"Cannot fetch {what} from the Hub at {constants.ENDPOINT} ({type(cause).__name__}: {one_line(cause)}), "
            f"and it is not in the local cache."
        ) from err
    except EntryNotFoundError as err:
        raise MissingFileError(f"{where}: no file {filename!r} in the repo.") from err
    except NETWORK_ERRORS as err:
        raise HubConnectionError(f"Cannot reach the Hub at {constants.ENDPOINT} ({action}): {one_line(err)}") from err
    except HfHubHTTPError as err:
        raise HubError(f"The Hub answered with an error ({action}): {one_line(err)}") from err


def one_line(err) -> str:
    return " ".join(str(err).split())


# (blob path, size, mtime) of cache files already hashed in this process.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_download(path: str, what: str) -> None:
    """Checks that a file in the HF cache hashes to the id it is stored under.

    The cache names each blob after the ETag the Hub sent: the sha256 of an LFS file, the git blob id
    (sha1 of `blob <size>\\0<content>`) of any other file. A file the cache does not hold that way
    (a local directory, a copied cache) is not checked. Raises CorruptFileError naming the file.
    """
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    stat = os.stat(blob)
    key = (blob, stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if _SHA256.match(expected):
        digest, kind = hashlib.sha256(), "sha256"
    elif _GIT_OID.match(expected):
        digest, kind = hashlib.sha1(b"blob %d\0" % stat.st_size), "git blob id"
    else:
        return
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CorruptFileError(
            f"{what}: the downloaded file {blob} has {kind} {digest.hexdigest()}, but the Hub stored it as "
            f"{expected}: it is corrupt or truncated. Delete it from the cache or pass force_download=True."
        )
    _VERIFIED.add(key)


def pretrained_source(path: str | os.PathLike, kwargs: dict) -> tuple[Resolver | None, str, dict]:
    """For `from_pretrained(path, **kwargs)`: a resolver of the rack's files (None when `path` is
    neither a directory nor a repo id), and the path and Hub arguments to load its adapters with."""
    path = os.fspath(path)
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        local = os.path.join(path, subfolder)
        return local_resolver(local), local, {}
    if not is_repo_id(path):
        return None, path, {}
    hub_kwargs = {k: kwargs.get(k) for k in ("revision", "token", "cache_dir")}
    hub_kwargs["subfolder"] = subfolder or None
    resolve = hub_resolver(path, **hub_kwargs, local_files_only=bool(kwargs.get("local_files_only")),
                           force_download=bool(kwargs.get("force_download")))
    return resolve, path, hub_kwargs


def download_checkpoint(repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        local_dir: str | os.PathLike | None = None) -> str:
    """Downloads a training checkpoint pushed with `push_checkpoint_to_hub` and returns a local
    directory holding exactly its files, to resume from as from a local checkpoint.

    Args:
        repo_id: the repo holding the checkpoint.
        revision: branch, tag or commit; pin a commit to resume from exactly that checkpoint.
        subfolder: the checkpoint's folder in the repo (its `path_in_repo`); default the repo root
            (whose `.gitattributes` and README.md are not part of the checkpoint).
        local_dir: where to put the files; default
            `<HF hub cache>/stackwise-checkpoints/<namespace>--<name>/<commit>[/<subfolder>]`.

    The files go through the HF cache and are verified against the ids the Hub stored them under;
    the directory then gets plain files (hard links to the cache where possible, which the
    checkpoint reader requires: it refuses symbolic links), so treat it as read-only. A directory for
    a commit already materialised is reused.
    """
    folder = (subfolder or "").strip("/")
    where = f"{repo_id}@{revision or 'main'}"
    with hub_errors(where, action=f"downloading a checkpoint from {where}"):
        snapshot = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir,
            allow_patterns=[f"{folder}/*"] if folder else None,
            ignore_patterns=None if folder else [".gitattributes", CARD_NAME],
        )
    source = os.path.join(snapshot, folder) if folder else snapshot
    files = _relative_files(source)
    if not files:
        raise FileNotFoundError(f"{where}: no checkpoint files{f' under {folder!r}' if folder else ''}.")
    for rel in files:
        verify_download(os.path.join(source, rel), f"{where}: {posixpath.join(folder, rel)}")
    if local_dir is None:
        commit = os.path.basename(os.path.normpath(snapshot))  # the cache keeps snapshots by commit id
        root = cache_dir or constants.HF_HUB_CACHE
        local_dir = os.path.join(root, "stackwise-checkpoints", repo_id.replace("/", "--"), commit, folder)
    local_dir = os.path.normpath(os.fspath(local_dir))
    if os.path.isdir(local_dir) and _relative_files(local_dir) == files:
        return local_dir
    parent = os.path.dirname(local_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=parent)
    for rel in files:
        blob, dest = os.path.realpath(os.path.join(source, rel)), os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.link(blob, dest)
        except OSError:  # another filesystem, or no hard links there
            shutil.copyfile(blob, dest)
    if os.path.isdir(local_dir):
        shutil.rmtree(local_dir)
    os.replace(tmp, local_dir)
    return local_dir


def _relative_files(directory: str) -> list[str]:
    """POSIX paths, relative to `directory`, of every file under it."""
    found = (os.path.join(d, f) for d, _, names in os.walk(directory) for f in names)
    return sorted(os.path.relpath(path, directory).replace(os.sep, "/") for path in found)


def resolve_checkpoint_location(location: str, *, revision: str | None = None, token: str | bool | None = None,
                                cache_dir: str | None = None) -> str:
    """A local checkpoint directory for `location`: a directory as it is, or a Hub location
    "namespace/name[@revision][/sub/folder]" downloaded with `download_checkpoint`.

    `revision` applies when `location` names none.
    """
    if os.path.isdir(location):
        return location
    match = re.fullmatch(r"(?P<repo>[\w.-]+/[\w.-]+?)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?", location)
    if os.path.exists(location) or location.startswith((".", "/")) or match is None:
        raise FileNotFoundError(
            f"{location}: not a checkpoint directory, nor a Hub location 'namespace/name[@revision][/folder]'."
        )
    return download_checkpoint(match["repo"], revision=match["rev"] or revision, subfolder=match["sub"],
                               token=token, cache_dir=cache_dir)
