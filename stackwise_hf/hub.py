"""The write side of the Hub: push racks, single stacks, adapters and training checkpoints.

Reading (pulling, verifying downloads, downloading checkpoints) is `resolver.py`'s; every push here
takes its commit settings as one `PushOptions` (or its fields as keywords).

A pushed rack repo is a rack directory (`save_rack`, layout in `layout.py`) plus a model card:

```
config.json, generation_config.json
model.safetensors.index.json            # weight map; metadata.stacks[i].files lists stack i's shards
model-rack.safetensors                  # embeddings, final norm, LM head
model-stack000.safetensors, ...         # stack i in model-stack{i:03d}[-0000k-of-0000n].safetensors
quantization.json, quantized-stack000.safetensors   # when the rack has quantized stacks
adapters/stackwise_adapters.json        # adapter manifest (when the rack has or had adapters)
adapters/<name>/adapter_config.json, adapters/<name>/adapter_model.safetensors   # peft's layout
tokenizer.json, tokenizer_config.json, ...                # when a tokenizer is pushed with it
README.md                               # model card: YAML metadata and a table of stacks
loss.png                                # the run's loss plot, when a training run is given
configuration_stackwise.py, modeling_stackwise.py, ...    # layout.REMOTE_CODE_FILES, unless remote_code=False
```

Atomicity. Every push is one `HfApi.create_commit`: the files are prepared first (in a temporary
directory, never in the caller's), the head of the target branch is read, and the commit adds every
file and deletes the weight and adapter files the new index and manifest no longer name, with
`parent_commit` set to that head. So a remote index never points at a missing or stale shard; a
failed upload or commit leaves the branch where it was (the error says so, after reading the head
again); and a push that raced with another writer fails (HTTP 412) instead of mixing two racks.

Code on the Hub. By default a saved or pushed rack carries exactly the modules
`layout.REMOTE_CODE_FILES` names and an `auto_map` in its config; they import only torch, transformers,
huggingface_hub and safetensors, so `trust_remote_code=True` loads the rack where stackwise_hf is not
installed (`remote_code=False`, `stackwise push --no-remote-code` leave the code out).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError

from .errors import CorruptFileError, ShapeMismatchError
from .layout import (
    ADAPTER_MANIFEST,
    ADAPTERS_DIR,
    CARD_NAME,
    CONFIG_NAME,
    INDEX_NAME,
    LOSS_PLOT_NAME,
    REMOTE_CODE_FILES,
    WEIGHT_FILE,
    remote_code_auto_map,
)
from .model_card import render_card, rows_from_card, stack_rows, training_by_stack, with_training
from .rack_files import check_same_architecture, write_adapters, write_rack, write_stack
from .resolver import (  # noqa: F401  (the pull side, importable from here as before)
    NETWORK_ERRORS,
    HubConnectionError,
    HubError,
    download_checkpoint,
    hub_errors,
    hub_resolver,
    local_resolver,
    one_line,
    resolve_checkpoint_location,
)
from .serialization import check_files, json_text, read_index
from .stacks import check_stack_indices, stack_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushOptions:
    """How a push commits, shared by every push function and rack method.

    Args:
        commit_message (`str`, *optional*): defaults to a summary of what is pushed.
        commit_description (`str`, *optional*): the commit's longer description.
        private (`bool`, *optional*): visibility of a repo the push creates (an existing repo is kept as it is).
        token (`str` or `bool`, *optional*): the Hub token; defaults to the logged-in one.
        revision (`str`, *optional*): the branch to commit to (created from main when missing).
        create_pr (`bool`, defaults to `False`): open a pull request instead of committing to the branch.

    Example:

    ```python
    >>> from stackwise_hf.hub import PushOptions
    >>> PushOptions.of(None, revision="dev").revision
    'dev'
    ```
    """

    commit_message: str | None = None
    commit_description: str | None = None
    private: bool | None = None
    token: str | bool | None = None
    revision: str | None = None
    create_pr: bool = False

    @classmethod
    def of(cls, options: PushOptions | None = None, **fields) -> PushOptions:
        """`options` (default: all defaults) with `fields` replacing its values; an unknown field raises
        TypeError naming it and the allowed ones."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise TypeError(f"unknown push option(s) {unknown}; allowed are {allowed}.")
        return dataclasses.replace(options or cls(), **fields)


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
        path = self.download(filename)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptFileError(f"{self.where}: {filename} is not valid JSON ({err}).") from err


def _open_target(repo_id: str, options: PushOptions, *, create: bool) -> _Target:
    """Resolves the repo (creating it when `create`; an existing repo is kept as it is) and the branch
    (created from main when missing, as transformers does), and reads its head and file list."""
    token, revision = options.token, options.revision
    api = HfApi(token=token)
    with hub_errors(f"{repo_id}@{revision or 'main'}", action=f"preparing a push to {repo_id}"):
        if create:
            repo_id = api.create_repo(repo_id, private=options.private, exist_ok=True).repo_id
        elif "/" not in repo_id:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
    where = f"{repo_id}@{revision or 'main'}"
    with hub_errors(where, action=f"preparing a push to {where}"):
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
        files = set(api.list_repo_files(repo_id, revision=head))
    return _Target(api, repo_id, revision, head, files)


def _commit(target: _Target, operations: list, default_message: str, options: PushOptions):
    """One commit on top of `target.head`; on failure, says whether the branch moved."""
    adds = sum(isinstance(op, CommitOperationAdd) for op in operations)
    try:
        info = target.api.create_commit(
            target.repo_id, operations, commit_message=options.commit_message or default_message,
            commit_description=options.commit_description, revision=target.revision, create_pr=options.create_pr,
            parent_commit=target.head,
        )
    except (*NETWORK_ERRORS, HfHubHTTPError, RuntimeError) as err:
        # huggingface_hub wraps a failed LFS upload in RuntimeError("Error while uploading '<file>' ...").
        cause = err.__cause__ if isinstance(err, RuntimeError) else err
        if not isinstance(cause, (*NETWORK_ERRORS, HfHubHTTPError)):
            raise
        error_cls = HubConnectionError if isinstance(cause, NETWORK_ERRORS) else HubError
        detail = f"{one_line(err)} " if cause is not err else ""
        raise error_cls(
            f"Pushing to {target.where} failed ({detail}{type(cause).__name__}: {one_line(cause)}). "
            f"{_state_after_failure(target)} The local files are untouched."
        ) from err
    logger.info("Pushed to %s: %s (%d files, %d deletions) -> %s", target.where, options.commit_message or default_message, adds,
                len(operations) - adds, info.commit_url)
    return info


def _state_after_failure(target: _Target) -> str:
    try:
        head = target.api.repo_info(target.repo_id, revision=target.revision).sha
    except (*NETWORK_ERRORS, HfHubHTTPError):
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


# A rack ----------------------------------------------------------------------------------------------


def push_rack_folder_to_hub(path: str | os.PathLike, repo_id: str, options: PushOptions | None = None, *,
                            tags: list[str] | None = None, training_run=None,
                            loss_plot: str | os.PathLike | None = None, remote_code: bool | None = None,
                            **option_fields):
    """Pushes a saved rack directory (`save_rack`, or a run's `final/`) with a generated model card,
    in one commit. `path` is only read.

    Args:
        path: the rack directory: config, index and shards, and whatever else it holds (adapters,
            tokenizer, modeling code), all of which is uploaded.
        repo_id: the target repo, created if missing (`private` applies then); an existing repo is updated.
        options (`PushOptions`, *optional*): commit settings; `option_fields` (its field names as keywords:
            `commit_message`, `revision`, `token`, ...) override them.
        tags: extra model-card tags.
        training_run: a training output directory (with `log.jsonl`, and `loss.png` when drawn), or the
            run's log records, for the card's tokens trained and eval loss per stack.
        loss_plot: a PNG to show in the card; defaults to the run directory's `loss.png`.
        remote_code (`bool`, *optional*): True: the pushed rack carries this package's modeling code and an
            `auto_map` (added when the folder lacks them); False: it carries neither (and the repo's copy of
            the code is deleted); None (default): the folder is pushed as it is.

    Returns:
        huggingface_hub's `CommitInfo` (`commit_url`, `oid`, `pr_url`).
    """
    options = PushOptions.of(options, **option_fields)
    path = os.fspath(path)
    resolve = local_resolver(path)
    index = read_index(resolve)  # raises naming the file if the directory holds no rack
    check_files(resolve, index["weight_map"].values())
    with open(resolve(CONFIG_NAME), encoding="utf-8") as f:
        config = json.load(f)
    training, plot = _training_inputs(training_run, loss_plot)
    files = _folder_files(path)
    if remote_code is not None:
        config = _with_remote_code(files, config, remote_code)
    local_card = files.pop(CARD_NAME, None)
    target = _open_target(repo_id, options, create=True)
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
    if remote_code is not None:  # the config as amended above, in place of the folder's
        operations = [op for op in operations if op.path_in_repo != CONFIG_NAME]
        operations.append(CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=json_text(config).encode()))
    if plot is not None:
        operations.append(CommitOperationAdd(path_in_repo=LOSS_PLOT_NAME, path_or_fileobj=plot))
    pushed = {op.path_in_repo for op in operations}
    stale = sorted(f for f in target.files - pushed if WEIGHT_FILE.match(f) or f.startswith(f"{ADAPTERS_DIR}/")
                   or (remote_code is False and f in REMOTE_CODE_FILES))
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    return _commit(target, operations, _describe_rack_push(config, files), options)


def _with_remote_code(files: dict[str, str], config: dict, remote_code: bool) -> dict:
    """Adds this package's `REMOTE_CODE_FILES` to `files` and an `auto_map` to (a copy of) `config`, or
    removes both; returns the config to push."""
    config = dict(config)
    package = os.path.dirname(os.path.abspath(__file__))
    for name in REMOTE_CODE_FILES:
        if remote_code:
            files[name] = os.path.join(package, name)
        else:
            files.pop(name, None)
    if remote_code:
        config["auto_map"] = remote_code_auto_map((config.get("architectures") or [""])[0])
    else:
        config.pop("auto_map", None)
    return config


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


def push_rack_to_hub(rack, repo_id: str, options: PushOptions | None = None, *, max_shard_size: int | str = "5GB",
                     tokenizer=None, tags: list[str] | None = None, training_run=None,
                     loss_plot: str | os.PathLike | None = None, remote_code: bool = True, **option_fields):
    """Saves the whole rack (`rack_files.write_rack`: weights in per-stack shards, quantized stacks,
    adapters, and the modeling code unless `remote_code=False`) and `tokenizer` to a temporary
    directory and pushes it with `push_rack_folder_to_hub`, in one commit."""
    with tempfile.TemporaryDirectory(prefix="stackwise-push-") as tmp:
        write_rack(rack, tmp, max_shard_size=max_shard_size, remote_code=remote_code)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return push_rack_folder_to_hub(tmp, repo_id, options, tags=tags, training_run=training_run,
                                       loss_plot=loss_plot, remote_code=remote_code, **option_fields)


# One stack -------------------------------------------------------------------------------------------


def push_stack_to_hub(rack, stack_idx: int, repo_id: str, options: PushOptions | None = None, *,
                      max_shard_size: int | str = "5GB", training_run=None, **option_fields):
    """Pushes one stack of `rack` into a rack repo, in one commit: the stack's new shards, the index
    with that stack's entries replaced, `config.json` when the stack's dtype changes or the stack is
    new, and the model card's row for it; the stack's old shards are deleted.

    The repo must already hold a rack of the same architecture. Stack `stack_idx` either replaces the
    remote stack of that index (same number of blocks) or, when the remote rack has exactly
    `stack_idx` stacks, is appended to it (progressive training: push each new stack as it is
    trained). The rack's embeddings, final norm and head are not pushed (`push_to_hub` pushes all).

    Args:
        options / option_fields: commit settings (`PushOptions`).
        training_run: as for `push_rack_folder_to_hub`; fills the stack's tokens trained and eval loss
            in the card (left empty otherwise, since the stack's earlier figures no longer apply).
    """
    options = PushOptions.of(options, **option_fields)
    (stack_idx,) = check_stack_indices(rack, stack_idx)
    target = _open_target(repo_id, options, create=False)
    if INDEX_NAME not in target.files or CONFIG_NAME not in target.files:
        raise FileNotFoundError(
            f"{target.where} holds no rack ({CONFIG_NAME} and {INDEX_NAME} are needed); push the whole rack "
            f"first with `push_to_hub`."
        )
    config = target.read_json(CONFIG_NAME)
    remote = type(rack.config).from_dict(config)
    check_same_architecture(rack.config, remote, target.where)
    appending = _check_stack_fits_remote(rack, stack_idx, remote, target.where)
    index = read_index(target.download)
    training, plot = _training_inputs(training_run, None)
    with tempfile.TemporaryDirectory(prefix="stackwise-push-stack-") as tmp:
        write_stack(rack, stack_idx, tmp, max_shard_size=max_shard_size)
        stack_index = read_index(local_resolver(tmp))
        new_index = _index_with_stack(index, stack_index, stack_idx, rack, appending)
        new_files = stack_index["metadata"]["stacks"][str(stack_idx)]["files"]
        old_files = index["metadata"]["stacks"].get(str(stack_idx), {}).get("files", [])
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(tmp, f)) for f in new_files]
        operations.append(CommitOperationAdd(path_in_repo=INDEX_NAME, path_or_fileobj=json_text(new_index, True).encode()))
        config = _config_with_stack(config, rack, stack_idx, appending)
        if config is not None:
            operations.append(CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=json_text(config, True).encode()))
        if plot is not None:
            operations.append(CommitOperationAdd(path_in_repo=LOSS_PLOT_NAME, path_or_fileobj=plot))
        (row,) = with_training(_stack_row(tmp, stack_idx), training)
        card = _updated_card(target, new_index, row, config or target.read_json(CONFIG_NAME), plot is not None)
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
        operations += [CommitOperationDelete(path_in_repo=f) for f in sorted(set(old_files) - set(new_files))]
        blocks, dtype = rack.config.stack_sizes[stack_idx], rack.config.stack_dtypes[stack_idx]
        message = (f"{'Add' if appending else 'Update'} stack {stack_idx}: {blocks} block{'s' * (blocks != 1)}, "
                   f"{dtype}, {rack.get_stack_info(stack_idx)['parameters']:,} parameters")
        return _commit(target, operations, message, options)


def _check_stack_fits_remote(rack, stack_idx: int, remote, where: str) -> bool:
    """Whether stack `stack_idx` is appended to the remote rack (True) or replaces one of its stacks;
    raises when it does neither."""
    sizes, local_blocks = list(remote.stack_sizes), rack.config.stack_sizes[stack_idx]
    if stack_idx > len(sizes):
        raise IndexError(
            f"{where} has stacks 0..{len(sizes) - 1}; stack {stack_idx} can replace one of them or be "
            f"appended as stack {len(sizes)}, not leave a gap."
        )
    if stack_idx == len(sizes):
        if list(rack.config.stack_sizes[:stack_idx]) != sizes:
            raise ShapeMismatchError(
                f"{where} has stacks of {sizes} blocks; this rack's first {stack_idx} stacks have "
                f"{rack.config.stack_sizes[:stack_idx]}, so its stack {stack_idx} does not extend the remote rack."
            )
        return True
    if sizes[stack_idx] != local_blocks:
        raise ShapeMismatchError(f"{where}: stack {stack_idx} has {sizes[stack_idx]} blocks; this rack's has {local_blocks}.")
    return False


def _index_with_stack(index: dict, stack_index: dict, stack_idx: int, rack, appending: bool) -> dict:
    """The remote index with stack `stack_idx`'s entries replaced by those of a stack directory's index."""
    remote_dtypes = [m.get("dtype") for _, m in sorted(index["metadata"]["stacks"].items(), key=lambda kv: int(kv[0]))]
    numel = rack.get_stack_info(stack_idx)["parameters"]
    old_bytes = 0 if appending else numel * _itemsize(remote_dtypes[stack_idx] or rack.config.stack_dtypes[stack_idx])
    weight_map = {k: f for k, f in index["weight_map"].items() if stack_of(k) != stack_idx}
    weight_map.update(stack_index["weight_map"])
    metadata = dict(index["metadata"])
    metadata["stacks"] = {**metadata["stacks"], str(stack_idx): {
        "files": stack_index["metadata"]["stacks"][str(stack_idx)]["files"],
        "num_blocks": rack.config.stack_sizes[stack_idx], "dtype": rack.config.stack_dtypes[stack_idx]}}
    metadata["stacks"] = dict(sorted(metadata["stacks"].items(), key=lambda kv: int(kv[0])))
    if "total_size" in metadata:
        metadata["total_size"] += stack_index["metadata"]["total_size"] - old_bytes
    if appending and "total_parameters" in metadata:
        metadata["total_parameters"] += numel
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _config_with_stack(config: dict, rack, stack_idx: int, appending: bool) -> dict | None:
    """The remote config after the push, or None when it does not change (same stack, same dtype)."""
    sizes, dtypes = list(config["stack_sizes"]), list(config["stack_dtypes"])
    local_blocks, local_dtype = rack.config.stack_sizes[stack_idx], rack.config.stack_dtypes[stack_idx]
    if not appending and dtypes[stack_idx] == local_dtype:
        return None
    if appending:
        sizes, dtypes = sizes + [local_blocks], dtypes + [local_dtype]
    else:
        dtypes[stack_idx] = local_dtype
    config = {**config, "stack_sizes": sizes, "stack_dtypes": dtypes}
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = sum(sizes)
    type(rack.config).from_dict(config)  # the updated config must still be valid
    return config


def _itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


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


# One adapter -----------------------------------------------------------------------------------------


def push_adapter_to_hub(rack, name: str, repo_id: str, options: PushOptions | None = None, **option_fields):
    """Pushes one adapter of `rack` (peft's files under `adapters/<name>/`) and the repo's adapter
    manifest with that adapter's entry added or replaced, in one commit.

    The repo is created if missing. When it holds a rack, the adapter's stacks must exist there with
    the same number of blocks. Pull it back with `load_adapters(rack, repo_id, names=[name])`, or with
    plain peft: `PeftModel.from_pretrained(rack, repo_id, subfolder=f"adapters/{name}", adapter_name=name)`.
    """
    options = PushOptions.of(options, **option_fields)
    live = sorted(getattr(rack, "peft_config", None) or {})
    if name not in live:
        raise ValueError(f"Unknown adapter {name!r}; the rack has {live}.")
    target = _open_target(repo_id, options, create=True)
    with tempfile.TemporaryDirectory(prefix="stackwise-push-adapter-") as tmp:
        write_adapters(rack, tmp)
        with open(os.path.join(tmp, ADAPTER_MANIFEST), encoding="utf-8") as f:
            local = json.load(f)
        (entry,) = [e for e in local["adapters"] if e["name"] == name]
        if CONFIG_NAME in target.files:
            _check_adapter_fits(target, rack, entry)
        manifest = target.read_json(ADAPTER_MANIFEST) if ADAPTER_MANIFEST in target.files else {
            "format_version": local["format_version"], "adapters": []}
        manifest["adapters"] = [e for e in manifest["adapters"] if e["name"] != name] + [entry]
        prefix = f"{ADAPTERS_DIR}/{entry['folder']}/"
        files = {prefix + p: local_path for p, local_path in _folder_files(os.path.join(tmp, prefix)).items()}
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local_path) for p, local_path in files.items()]
        operations.append(CommitOperationAdd(path_in_repo=ADAPTER_MANIFEST,
                                             path_or_fileobj=json_text(manifest, True).encode()))
        operations += [CommitOperationDelete(path_in_repo=f)
                       for f in sorted(target.files) if f.startswith(prefix) and f not in files]
        return _commit(target, operations, f"Upload adapter {name}: stacks {entry['stacks']}, ranks {entry.get('r')}",
                       options)


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


# A training checkpoint -------------------------------------------------------------------------------


def push_checkpoint_to_hub(checkpoint_dir: str | os.PathLike, repo_id: str, options: PushOptions | None = None, *,
                           path_in_repo: str = "", **option_fields):
    """Pushes a training checkpoint directory to `path_in_repo` (default the repo root) in one commit;
    files of an earlier checkpoint there that this one lacks are deleted, so the folder is exactly
    this checkpoint (earlier ones stay reachable by revision). `checkpoint_dir` is only read.

    Resume from it with `resume_from_checkpoint="namespace/name[@revision][/path_in_repo]"`
    (`resolve_checkpoint_location`), or `download_checkpoint(repo_id, revision=..., subfolder=...)`.
    """
    options = PushOptions.of(options, **option_fields)
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise NotADirectoryError(f"{checkpoint_dir}: expected a checkpoint directory.")
    files = _folder_files(checkpoint_dir)
    if not files:
        raise FileNotFoundError(f"{checkpoint_dir}: the checkpoint directory is empty.")
    _check_checkpoint_manifest(checkpoint_dir)
    prefix = path_in_repo.strip("/")
    target = _open_target(repo_id, options, create=True)
    in_repo = {f"{prefix}/{p}" if prefix else p: local for p, local in files.items()}
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=local) for p, local in in_repo.items()]
    keep = {".gitattributes", CARD_NAME} if not prefix else set()
    stale = sorted(f for f in target.files - set(in_repo) - keep if not prefix or f.startswith(f"{prefix}/"))
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    size = sum(os.path.getsize(local) for local in files.values())
    message = (f"Upload training checkpoint {os.path.basename(os.path.normpath(checkpoint_dir))}"
               f"{f' to {prefix}/' if prefix else ''} ({len(files)} files, {size:,} bytes)")
    return _commit(target, operations, message, options)


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
