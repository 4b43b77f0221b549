"""Hub IO: push and pull racks, single stacks, adapters and training checkpoints.

A pushed rack repo is a rack directory (`save_rack`) plus a model card:

```
config.json, generation_config.json
model.safetensors.index.json            # weight map; metadata.stacks[i].files lists stack i's shards
model-rack.safetensors                  # embeddings, final norm, LM head
model-stack000.safetensors, ...         # stack i in model-stack{i:03d}[-0000k-of-0000n].safetensors
adapters/stackwise_adapters.json        # adapter manifest (when the rack has or had adapters)
adapters/<name>/adapter_config.json, adapters/<name>/adapter_model.safetensors   # peft's layout
tokenizer.json, tokenizer_config.json, ...                # when a tokenizer is pushed with it
README.md                               # model card: YAML metadata and a table of stacks
loss.png                                # the run's loss plot, when a training run is given
configuration_stackwise.py, modeling_stackwise.py, ...    # after register_for_auto_class
```

Atomicity. Every push is one `HfApi.create_commit`: the files are prepared first (in a temporary
directory, never in the caller's), the head of the target branch is read, and the commit adds every
file and deletes the weight and adapter files the new index and manifest no longer name, with
`parent_commit` set to that head. So a remote index never points at a missing or stale shard; a
failed upload or commit leaves the branch where it was (the error says so, after reading the head
again); and a push that raced with another writer fails (HTTP 412) instead of mixing two racks.

Verification. `huggingface_hub` checks each download's size against the server's; on top of that,
every file read through `hub_resolver` (stacks, adapters, the index, and all shards in
`from_pretrained`) is hashed and compared with the id the Hub stored it under (sha256 for LFS
files, the git blob id otherwise), which also catches a cache file damaged after download, and
every shard's safetensors header is checked against its length before anything is loaded.

Code on the Hub. After `StackWiseConfig.register_for_auto_class()` and
`StackWiseForCausalLM.register_for_auto_class("AutoModelForCausalLM")`, `save_pretrained` copies
`modeling_stackwise.py` and the modules transformers finds through its `from .x import` lines
(configuration_stackwise, rack, growth, serialization, errors, hub, model_card); that set imports
only torch, transformers, huggingface_hub and safetensors, so `trust_remote_code=True` loads the
rack where stackwise_hf is not installed. Modules that need more (adapters: peft; training:
accelerate) are imported as `from . import adapters`, which transformers does not follow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

from huggingface_hub import (
    _CACHED_NO_EXIST,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
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

from .errors import CorruptFileError, ShapeMismatchError, StackWiseError
from .growth import check_stack_indices
from .model_card import (
    CARD_NAME,
    LOSS_PLOT_NAME,
    render_card,
    rows_from_card,
    stack_rows,
    training_by_stack,
    with_training,
)
from .rack import _check_same_architecture
from .serialization import INDEX_NAME, Resolver, check_files, local_resolver, read_index, stack_of

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
ADAPTERS_DIR = "adapters"
ADAPTER_MANIFEST = f"{ADAPTERS_DIR}/stackwise_adapters.json"
# Root files a rack push replaces wholesale: a stale one would be read instead of (or beside) the new
# index (transformers prefers a single `model.safetensors` over an index).
_WEIGHT_FILE = re.compile(r"^(?:model(?:-[^/]+)?\.safetensors|pytorch_model(?:-[^/]+)?\.bin(?:\.index\.json)?)$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID = re.compile(r"^[0-9a-f]{40}$")
_NETWORK_ERRORS = (TransportError, OfflineModeIsEnabled, ConnectionError)


class HubError(StackWiseError, OSError):
    """A Hub request failed. The message says what was attempted and in what state the remote repo is."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub could not be reached (network down, server gone, `HF_HUB_OFFLINE=1`)."""


# Pulling -------------------------------------------------------------------------------------------


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
        with _hub_errors(where, filename=filename, local_files_only=local_files_only):
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
    except _NETWORK_ERRORS as err:
        if cached is _CACHED_NO_EXIST:
            raise FileNotFoundError(f"{repo_id}@{revision or 'main'}: no file {path!r} in the repo (as cached; "
                                    f"the Hub cannot be reached).") from err
        raise LocalEntryNotFoundError(f"{path} is not cached and the Hub cannot be reached") from err
    except HfHubHTTPError:
        pass  # not found, refused...: hf_hub_download meets the same answer and raises it
    return True


@contextmanager
def _hub_errors(where: str, *, filename: str | None = None, action: str | None = None, local_files_only: bool = False):
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
        error_cls = HubConnectionError if isinstance(cause, _NETWORK_ERRORS) else HubError
        raise error_cls(
            f"Cannot fetch {what} from the Hub at {constants.ENDPOINT} ({type(cause).__name__}: {_one_line(cause)}), "
            f"and it is not in the local cache."
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{where}: no file {filename!r} in the repo.") from err
    except _NETWORK_ERRORS as err:
        raise HubConnectionError(f"Cannot reach the Hub at {constants.ENDPOINT} ({action}): {_one_line(err)}") from err
    except HfHubHTTPError as err:
        raise HubError(f"The Hub answered with an error ({action}): {_one_line(err)}") from err


def _one_line(err) -> str:
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
    with _hub_errors(where, action=f"downloading a checkpoint from {where}"):
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


# Pushing -------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """The branch a push commits to, and what it held when the push started."""

    api: HfApi
    repo_id: str
    revision: str | None
    head: str
    files: set[str]

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision or 'main'}"

    def download(self, filename: str) -> str:
        """A file of the head commit, verified."""
        resolve = hub_resolver(self.repo_id, revision=self.head, token=self.api.token)
        return resolve(filename)

    def read_json(self, filename: str) -> dict:
        with open(self.download(filename), encoding="utf-8") as f:
            return json.load(f)


def _open_target(repo_id: str, *, token, revision: str | None, create: bool, private: bool | None = None) -> _Target:
    """Resolves the repo (creating it when `create`; an existing repo is kept as it is) and the branch
    (created from main when missing, as transformers does), and reads its head and file list."""
    api = HfApi(token=token)
    with _hub_errors(f"{repo_id}@{revision or 'main'}", action=f"preparing a push to {repo_id}"):
        if create:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        elif "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    where = f"{repo_id}@{revision or 'main'}"
    with _hub_errors(where, action=f"preparing a push to {where}"):
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
        files = set(api.list_repo_files(repo_id, revision=head))
    return _Target(api, repo_id, revision, head, files)


def _commit(target: _Target, operations: list, message: str, description: str | None, create_pr: bool):
    """One commit on top of `target.head`; on failure, says whether the branch moved."""
    adds = sum(isinstance(op, CommitOperationAdd) for op in operations)
    try:
        info = target.api.create_commit(
            target.repo_id, operations, commit_message=message, commit_description=description,
            revision=target.revision, create_pr=create_pr, parent_commit=target.head,
        )
    except (*_NETWORK_ERRORS, HfHubHTTPError, RuntimeError) as err:
        # huggingface_hub wraps a failed LFS upload in RuntimeError("Error while uploading '<file>' ...").
        cause = err.__cause__ if isinstance(err, RuntimeError) else err
        if not isinstance(cause, (*_NETWORK_ERRORS, HfHubHTTPError)):
            raise
        error_cls = HubConnectionError if isinstance(cause, _NETWORK_ERRORS) else HubError
        detail = f"{_one_line(err)} " if cause is not err else ""
        raise error_cls(
            f"Pushing to {target.where} failed ({detail}{type(cause).__name__}: {_one_line(cause)}). "
            f"{_state_after_failure(target)} The local files are untouched."
        ) from err
    logger.info("Pushed to %s: %s (%d files, %d deletions) -> %s", target.where, message, adds,
                len(operations) - adds, info.commit_url)
    return info


def _state_after_failure(target: _Target) -> str:
    try:
        head = target.api.repo_info(target.repo_id, revision=target.revision).sha
    except (*_NETWORK_ERRORS, HfHubHTTPError):
        return (f"Nothing was committed by this push; the branch could not be read back to confirm it "
                f"(head was {target.head[:12]}).")
    if head == target.head:
        return f"Nothing was committed: {target.where} is still at {head[:12]}."
    return f"{target.where} moved from {target.head[:12]} to {head[:12]} meanwhile (another writer?)."


def _folder_files(directory: str) -> dict[str, str]:
    """path in repo -> local path for every file under `directory` (hidden and `.tmp` files skipped)."""
    files = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and not name.endswith(".tmp"):
                local = os.path.join(root, name)
                files[os.path.relpath(local, directory).replace(os.sep, "/")] = local
    return files


def _training_inputs(training_run, loss_plot) -> tuple[dict[int, dict], str | None]:
    training = training_by_stack(training_run) if training_run is not None else {}
    if loss_plot is None and isinstance(training_run, (str, os.PathLike)) and os.path.isdir(training_run):
        candidate = os.path.join(training_run, LOSS_PLOT_NAME)
        loss_plot = candidate if os.path.isfile(candidate) else None
    if loss_plot is not None and not os.path.isfile(loss_plot):
        raise FileNotFoundError(f"{loss_plot}: no such loss plot.")
    return training, None if loss_plot is None else os.fspath(loss_plot)


def push_rack_folder_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
    training_run=None,
    loss_plot: str | os.PathLike | None = None,
):
    """Pushes a saved rack directory (`save_rack`, or a run's `final/`) with a generated model card,
    in one commit. `path` is only read.

    Args:
        path: the rack directory: config, index and shards, and whatever else it holds (adapters,
            tokenizer, modeling code), all of which is uploaded.
        repo_id: the target repo, created if missing (`private` applies then); an existing repo is updated.
        commit_message / commit_description: default to a summary of what is pushed.
        token, revision, create_pr: as in `PushToHubMixin.push_to_hub` (a missing branch is created from main).
        tags: extra model-card tags.
        training_run: a training output directory (with `log.jsonl`, and `loss.png` when drawn), or the
            run's log records, for the card's tokens trained and eval loss per stack.
        loss_plot: a PNG to show in the card; defaults to the run directory's `loss.png`.

    Returns:
        huggingface_hub's `CommitInfo` (`commit_url`, `oid`, `pr_url`).
    """
    path = os.fspath(path)
    resolve = local_resolver(path)
    index = read_index(resolve)  # raises naming the file if the directory holds no rack
    check_files(resolve, index["weight_map"].values())
    with open(resolve(CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    training, plot = _training_inputs(training_run, loss_plot)
    files = _folder_files(path)
    local_card = files.pop(CARD_NAME, None)
    target = _open_target(repo_id, token=token, revision=revision, create=True, private=private)
    if local_card is not None:
        with open(local_card, encoding="utf-8") as f:
            existing = f.read()
    else:
        existing = _remote_card(target)
    card = render_card(
        with_training(stack_rows(path), training), repo_id=target.repo_id, config=config, existing=existing,
        tags=tags, loss_plot=plot is not None or LOSS_PLOT_NAME in target.files or LOSS_PLOT_NAME in files,
        remote_code=bool(config.get("auto_map")), total_parameters=index["metadata"].get("total_parameters"),
    )
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local) for p, local in files.items()]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    if plot is not None:
        operations.append(CommitOperationAdd(path_in_repo=LOSS_PLOT_NAME, path_or_fileobj=plot))
    pushed = {op.path_in_repo for op in operations}
    stale = sorted(f for f in target.files - pushed if _WEIGHT_FILE.match(f) or f.startswith(f"{ADAPTERS_DIR}/"))
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    message = commit_message or _describe_rack_push(config, files)
    return _commit(target, operations, message, commit_description, create_pr)


def _remote_card(target: _Target) -> str | None:
    if CARD_NAME not in target.files:
        return None
    with open(target.download(CARD_NAME), encoding="utf-8") as f:
        return f.read()


def _describe_rack_push(config: dict, files: dict[str, str]) -> str:
    sizes = config.get("stack_sizes", [])
    parts = [f"Upload rack: {len(sizes)} stacks of {sizes} blocks"]
    adapters = sorted({p.split("/")[1] for p in files if p.startswith(f"{ADAPTERS_DIR}/") and p.count("/") == 2})
    if adapters:
        parts.append(f"adapters {', '.join(adapters)}")
    if any(p.startswith("tokenizer") for p in files):
        parts.append("tokenizer")
    if any(p.endswith(".py") for p in files):
        parts.append("modeling code")
    return ", ".join(parts)


def push_rack_to_hub(rack, repo_id: str, *, max_shard_size: int | str = "5GB", tokenizer=None, **push_kwargs):
    """Saves the whole rack (`save_rack`: weights in per-stack shards, adapters, and the modeling code
    when registered for an auto class) and `tokenizer` to a temporary directory and pushes it with
    `push_rack_folder_to_hub` (whose keyword arguments `push_kwargs` are), in one commit."""
    with tempfile.TemporaryDirectory(prefix="stackwise-push-") as tmp:
        rack.save_rack(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return push_rack_folder_to_hub(tmp, repo_id, **push_kwargs)


def push_stack_to_hub(
    rack,
    stack_idx: int,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
    training_run=None,
):
    """Pushes one stack of `rack` into a rack repo, in one commit: the stack's new shards, the index
    with that stack's entries replaced, `config.json` when the stack's dtype changes or the stack is
    new, and the model card's row for it; the stack's old shards are deleted.

    The repo must already hold a rack of the same architecture. Stack `stack_idx` either replaces the
    remote stack of that index (same number of blocks) or, when the remote rack has exactly
    `stack_idx` stacks, is appended to it (progressive training: push each new stack as it is
    trained). The rack's embeddings, final norm and head are not pushed (`push_to_hub` pushes all).

    Args:
        training_run: as for `push_rack_folder_to_hub`; fills the stack's tokens trained and eval loss
            in the card (left empty otherwise, since the stack's earlier figures no longer apply).
    """
    (stack_idx,) = check_stack_indices(rack, stack_idx)
    target = _open_target(repo_id, token=token, revision=revision, create=False)
    if INDEX_NAME not in target.files or CONFIG_NAME not in target.files:
        raise FileNotFoundError(
            f"{target.where} holds no rack ({CONFIG_NAME} and {INDEX_NAME} are needed); push the whole rack "
            f"first with `push_to_hub`."
        )
    config = target.read_json(CONFIG_NAME)
    remote = type(rack.config).from_dict(config)
    _check_same_architecture(rack.config, remote, target.where)
    index = read_index(lambda name: target.download(name))
    sizes, dtypes = list(remote.stack_sizes), list(remote.stack_dtypes)
    local_blocks, local_dtype = rack.config.stack_sizes[stack_idx], rack.config.stack_dtypes[stack_idx]
    appending = stack_idx == len(sizes)
    if stack_idx > len(sizes):
        raise IndexError(
            f"{target.where} has stacks 0..{len(sizes) - 1}; stack {stack_idx} can replace one of them or be "
            f"appended as stack {len(sizes)}, not leave a gap."
        )
    if appending and list(rack.config.stack_sizes[:stack_idx]) != sizes:
        raise ShapeMismatchError(
            f"{target.where} has stacks of {sizes} blocks; this rack's first {stack_idx} stacks have "
            f"{rack.config.stack_sizes[:stack_idx]}, so its stack {stack_idx} does not extend the remote rack."
        )
    if not appending and sizes[stack_idx] != local_blocks:
        raise ShapeMismatchError(
            f"{target.where}: stack {stack_idx} has {sizes[stack_idx]} blocks; this rack's has {local_blocks}."
        )
    training, plot = _training_inputs(training_run, None)
    with tempfile.TemporaryDirectory(prefix="stackwise-push-stack-") as tmp:
        rack.save_stack(stack_idx, tmp, max_shard_size=max_shard_size)
        stack_index = read_index(local_resolver(tmp))
        new_files = stack_index["metadata"]["stacks"][str(stack_idx)]["files"]
        old_files = index["metadata"]["stacks"].get(str(stack_idx), {}).get("files", [])
        numel = rack.get_stack_info(stack_idx)["parameters"]
        old_bytes = 0 if appending else numel * _itemsize(dtypes[stack_idx])

        weight_map = {k: f for k, f in index["weight_map"].items() if stack_of(k) != stack_idx}
        weight_map.update(stack_index["weight_map"])
        metadata = dict(index["metadata"])
        metadata["stacks"] = {**metadata["stacks"],
                              str(stack_idx): {"files": new_files, "num_blocks": local_blocks, "dtype": local_dtype}}
        metadata["stacks"] = dict(sorted(metadata["stacks"].items(), key=lambda kv: int(kv[0])))
        if "total_size" in metadata:
            metadata["total_size"] += stack_index["metadata"]["total_size"] - old_bytes
        if appending and "total_parameters" in metadata:
            metadata["total_parameters"] += numel
        new_index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}

        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(tmp, f)) for f in new_files]
        operations.append(CommitOperationAdd(path_in_repo=INDEX_NAME, path_or_fileobj=_json_bytes(new_index)))
        if appending or dtypes[stack_idx] != local_dtype:
            if appending:
                sizes, dtypes = sizes + [local_blocks], dtypes + [local_dtype]
            else:
                dtypes = [local_dtype if i == stack_idx else d for i, d in enumerate(dtypes)]
            config = {**config, "stack_sizes": sizes, "stack_dtypes": dtypes}
            if "num_hidden_layers" in config:
                config["num_hidden_layers"] = sum(sizes)
            type(rack.config).from_dict(config)  # the updated config must still be valid
            operations.append(CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=_json_bytes(config)))
        if plot is not None:
            operations.append(CommitOperationAdd(path_in_repo=LOSS_PLOT_NAME, path_or_fileobj=plot))
        (row,) = with_training(_stack_row(tmp, stack_idx), training)
        card = _updated_card(target, new_index, row, config, plot is not None)
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
        operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(set(old_files) - set(new_files))]
        verb = "Add" if appending else "Update"
        message = commit_message or (
            f"{verb} stack {stack_idx}: {local_blocks} block{'s' * (local_blocks != 1)}, {local_dtype}, {numel:,} parameters"
        )
        return _commit(target, operations, message, commit_description, create_pr)


def _itemsize(dtype_name: str) -> int:
    import torch

    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _stack_row(directory: str, stack_idx: int) -> list[dict]:
    """The card row of the one stack saved in a stack directory (`save_stack`), adapters left empty."""
    return [row for row in stack_rows(directory) if row["stack"] == stack_idx]


def _updated_card(target: _Target, index: dict, row: dict, config: dict, new_plot: bool) -> str:
    """The remote card with stack `row["stack"]`'s row replaced (or added); other rows come from the
    card's metadata, or from the remote index when the card has none."""
    existing = _remote_card(target)
    rows = rows_from_card(existing)
    if rows is None:
        rows = [{"stack": int(i), "blocks": m.get("num_blocks"), "parameters": None, "dtype": m.get("dtype"),
                 "adapters": [], "tokens_trained": None, "eval_loss": None}
                for i, m in sorted(index["metadata"]["stacks"].items(), key=lambda kv: int(kv[0]))]
    by_stack = {r["stack"]: r for r in rows}
    previous = by_stack.get(row["stack"], {})
    by_stack[row["stack"]] = {**row, "adapters": previous.get("adapters") or []}
    return render_card(
        [by_stack[i] for i in sorted(by_stack)], repo_id=target.repo_id, config=config, existing=existing,
        loss_plot=new_plot or LOSS_PLOT_NAME in target.files, remote_code=bool(config.get("auto_map")),
        total_parameters=index["metadata"].get("total_parameters"),
    )


def push_adapter_to_hub(
    rack,
    name: str,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Pushes one adapter of `rack` (peft's files under `adapters/<name>/`) and the repo's adapter
    manifest with that adapter's entry added or replaced, in one commit.

    The repo is created if missing. When it holds a rack, the adapter's stacks must exist there with
    the same number of blocks. Pull it back with `load_adapters(rack, repo_id, names=[name])`, or with
    plain peft: `PeftModel.from_pretrained(rack, repo_id, subfolder=f"adapters/{name}", adapter_name=name)`.
    """
    from . import adapters as stack_adapters

    if name not in stack_adapters.adapter_names(rack):
        raise ValueError(f"Unknown adapter {name!r}; the rack has {stack_adapters.adapter_names(rack)}.")
    target = _open_target(repo_id, token=token, revision=revision, create=True, private=private)
    with tempfile.TemporaryDirectory(prefix="stackwise-push-adapter-") as tmp:
        stack_adapters.save_adapters(rack, tmp)
        with open(os.path.join(tmp, ADAPTER_MANIFEST), encoding="utf-8") as f:
            local = json.load(f)
        (entry,) = [e for e in local["adapters"] if e["name"] == name]
        if CONFIG_NAME in target.files:
            _check_adapter_fits(target, rack, entry)
        manifest = target.read_json(ADAPTER_MANIFEST) if ADAPTER_MANIFEST in target.files else {
            "format_version": local["format_version"], "adapters": []}
        entries = [e for e in manifest["adapters"] if e["name"] != name]
        manifest["adapters"] = entries + [entry]
        folder = os.path.join(tmp, ADAPTERS_DIR, entry["folder"])
        files = {f"{ADAPTERS_DIR}/{entry['folder']}/{p}": local_path for p, local_path in _folder_files(folder).items()}
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local_path) for p, local_path in files.items()]
        operations.append(CommitOperationAdd(path_in_repo=ADAPTER_MANIFEST, path_or_fileobj=_json_bytes(manifest)))
        prefix = f"{ADAPTERS_DIR}/{entry['folder']}/"
        operations += [CommitOperationDelete(path_in_repo=f)
                       for f in sorted(target.files) if f.startswith(prefix) and f not in files]
        message = commit_message or (
            f"Upload adapter {name}: stacks {entry['stacks']}, ranks {entry.get('r')}"
        )
        return _commit(target, operations, message, commit_description, create_pr)


def _check_adapter_fits(target: _Target, rack, entry: dict) -> None:
    remote_sizes = target.read_json(CONFIG_NAME).get("stack_sizes")
    if remote_sizes is None:
        return
    for i in entry["stacks"]:
        if i >= len(remote_sizes) or remote_sizes[i] != rack.config.stack_sizes[i]:
            raise ShapeMismatchError(
                f"{target.where}: adapter {entry['name']!r} adapts stack {i} of {rack.config.stack_sizes[i]} blocks; "
                f"the remote rack has stacks of {remote_sizes} blocks."
            )


def push_checkpoint_to_hub(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str = "",
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Pushes a training checkpoint directory to `path_in_repo` (default the repo root) in one commit;
    files of an earlier checkpoint there that this one lacks are deleted, so the folder is exactly
    this checkpoint (earlier ones stay reachable by revision). `checkpoint_dir` is only read.

    Resume from it with `resume_from_checkpoint="namespace/name[@revision][/path_in_repo]"`
    (`resolve_checkpoint_location`), or `download_checkpoint(repo_id, revision=..., subfolder=...)`.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise NotADirectoryError(f"{checkpoint_dir}: expected a checkpoint directory.")
    files = _folder_files(checkpoint_dir)
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: the checkpoint directory is empty.")
    _check_checkpoint_manifest(checkpoint_dir)
    prefix = path_in_repo.strip("/")
    target = _open_target(repo_id, token=token, revision=revision, create=True, private=private)
    in_repo = {f"{prefix}/{p}" if prefix else p: local for p, local in files.items()}
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local) for p, local in in_repo.items()]
    keep = {".gitattributes", CARD_NAME} if not prefix else set()
    stale = sorted(f for f in target.files - set(in_repo) - keep if not prefix or f.startswith(f"{prefix}/"))
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    size = sum(os.path.getsize(local) for local in files.values())
    message = commit_message or (
        f"Upload training checkpoint {os.path.basename(os.path.normpath(checkpoint_dir))}"
        f"{f' to {prefix}/' if prefix else ''} ({len(files)} files, {size:,} bytes)"
    )
    return _commit(target, operations, message, commit_description, create_pr)


def _check_checkpoint_manifest(checkpoint_dir: str) -> None:
    """When the checkpoint lists its files with sizes (`manifest.json`), refuses to push an incomplete one."""
    path = os.path.join(checkpoint_dir, "manifest.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(listed, dict):
        listed = [{"path": k, **(v if isinstance(v, dict) else {"size": v})} for k, v in listed.items()]
    for item in listed or []:
        if not isinstance(item, dict) or "path" not in item:
            continue
        local = os.path.join(checkpoint_dir, item["path"])
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{checkpoint_dir}: manifest.json lists {item['path']!r}, which is missing.")
        if isinstance(item.get("size"), int) and os.path.getsize(local) != item["size"]:
            raise CorruptFileError(
                f"{local}: {os.path.getsize(local)} bytes, manifest.json says {item['size']}; "
                f"not pushing an incomplete checkpoint."
            )


def has_file(resolve: Resolver, filename: str) -> bool:
    """True when the directory or repo behind `resolve` has `filename` (fetching it if it is remote)."""
    try:
        resolve(filename)
    except FileNotFoundError:
        return False
    return True
