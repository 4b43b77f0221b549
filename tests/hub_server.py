"""A Hugging Face Hub look-alike on 127.0.0.1, for tests that must run without the internet.

The real clients (huggingface_hub 1.x and 2.x, transformers, peft) talk to it exactly as they talk
to huggingface.co, provided that ``HF_ENDPOINT`` points at it *before* they are imported (the
module-level ``HfApi`` of huggingface_hub keeps the endpoint it saw at import) and that Xet is off
(``HF_HUB_DISABLE_XET=1``): this server speaks the git-LFS upload protocol, not Xet.

What it keeps, in memory, per repository: a git-like history (40-hex commit ids, branches,
``refs/pr/N`` pull-request refs, the whole file map of every commit, so any revision can be served)
and the LFS objects uploaded to it. What it offers to tests: a request log, byte counters, direct
views of the history and of file contents, fault injection per route (``fail_next``) and an
``offline()`` switch that makes the port refuse connections, as a network outage would.

Standard library only. One lock serialises the handling of requests, which is plenty for tests.

Example::

    with HubServer() as hub:                      # binds 127.0.0.1 on a free port
        os.environ["HF_ENDPOINT"] = hub.url       # before importing huggingface_hub
        ...
        hub.fail_next("commit", status=500)       # the next commit is refused
        assert hub.downloaded_files("me/model") == ["config.json"]
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# The account every token belongs to: repos created without a namespace land in it.
USER = "stackwise-tester"

# The Hub refuses to store a file of this size or more in plain git: it must go through LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# The `.gitattributes` the Hub commits into every new repo ("initial commit"): these files go to LFS.
_MODEL_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy"
    " *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/*"
    " *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
).split()
# Dataset repos also send audio and image files to LFS.
_DATASET_EXTRA_LFS_PATTERNS = (
    "*.lz4 *.pcm *.sam *.raw *.aac *.flac *.mp3 *.ogg *.wav *.bmp *.gif *.png *.tiff *.jpg *.jpeg *.webp"
).split()

_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _default_gitattributes(repo_type: str) -> bytes:
    patterns = list(_MODEL_LFS_PATTERNS)
    if repo_type == "dataset":
        patterns += _DATASET_EXTRA_LFS_PATTERNS
    return "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in patterns).encode()


def _lfs_patterns(gitattributes: Blob | None) -> list[str]:
    """The path patterns a `.gitattributes` file sends through LFS (`<pattern> filter=lfs ...`)."""
    if gitattributes is None:
        return []
    patterns = []
    for line in gitattributes.content.decode(errors="replace").splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def _matches(path: str, pattern: str) -> bool:
    """git's rule, simplified: a pattern without a slash matches the file name at any depth."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def _must_use_lfs(size: int, sample: bytes) -> bool:
    """Whatever the `.gitattributes` says, the Hub keeps big files and binary files out of plain git."""
    return size >= LFS_SIZE_THRESHOLD or b"\0" in sample[:512]


# --------------------------------------------------------------------------------------------------
# Storage model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """The content of one file; ``lfs`` says whether git holds it as an LFS pointer."""

    content: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.content)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The LFS pointer file git stores in place of the content."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @cached_property
    def oid(self) -> str:
        """The git blob id (``git hash-object``) of what git stores: the pointer for LFS files."""
        stored = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag (and the preupload ``oid``): sha256 for LFS files, the git id otherwise."""
        return self.sha256 if self.lfs else self.oid


@dataclass(frozen=True)
class Commit:
    """One commit: the whole file map after it, and what it changed relative to its parent."""

    oid: str
    parent: str | None
    message: str
    description: str
    date: str
    files: dict[str, Blob]
    changed: tuple[str, ...]  # paths added or overwritten
    deleted: tuple[str, ...]


@dataclass
class Repo:
    """A repo: commits by id, refs (``refs/heads/<branch>``, ``refs/pr/<n>``) and its LFS objects by sha256."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name, a full ref name (``refs/pr/1``) or a full commit id, as the Hub accepts them."""
        for ref in (f"refs/heads/{revision}", revision):
            if ref in self.refs:
                return self.commits[self.refs[ref]]
        return self.commits.get(revision)

    def writable_ref(self, revision: str) -> str | None:
        """The ref a commit to ``revision`` moves: only branches and pull requests can take commits."""
        for ref in (f"refs/heads/{revision}", revision):
            if ref in self.refs and ref.startswith(("refs/heads/", "refs/pr/")):
                return ref
        return None

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        commits, commit = [], self.resolve(revision)
        while commit is not None:
            commits.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return commits


# --------------------------------------------------------------------------------------------------
# Requests, responses and routes
# --------------------------------------------------------------------------------------------------


@dataclass
class Request:
    """An HTTP request, with the parameters its route pattern extracted."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    params: dict[str, str]  # from the route pattern, percent-decoded

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('host', '127.0.0.1')}"

    @property
    def repo_type(self) -> str:
        plural = self.params.get("type") or self.params.get("prefix") or "models"
        return plural[:-1]

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def json(self) -> dict:
        return json.loads(self.body or b"{}")


@dataclass
class Response:
    """What a route answers; the transport adds Content-Length and leaves the body out for HEAD."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    served_file: str | None = None  # the repo file whose content the body carries (resolve)


class _Reject(Exception):
    """Raised by a route to answer with an error response right away."""

    def __init__(self, response: Response):
        super().__init__(response.headers.get("X-Error-Message"))
        self.response = response


def _json(payload, status: int = 200, content_type: str = "application/json") -> Response:
    return Response(status, json.dumps(payload).encode(), {"Content-Type": content_type})


def _error(status: int, message: str, code: str | None = None, **extra) -> Response:
    """An error as the Hub sends it: JSON body plus the X-Error-* headers `hf_raise_for_status` reads."""
    response = _json({"error": message, **extra}, status)
    response.headers["X-Error-Message"] = message
    if code is not None:
        response.headers["X-Error-Code"] = code
    return response


def _repo_not_found() -> _Reject:
    return _Reject(_error(404, "Repository not found", "RepoNotFound"))


def _revision_not_found(revision: str) -> _Reject:
    return _Reject(_error(404, f"Invalid rev id: {revision}", "RevisionNotFound"))


def _entry_not_found(commit: Commit, message: str = "Entry not found") -> _Reject:
    response = _error(404, message, "EntryNotFound")
    response.headers["X-Repo-Commit"] = commit.oid  # lets the client cache the file's absence
    return _Reject(response)


_TYPE = r"(?P<type>models|datasets|spaces)"
_PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_REV = r"(?P<rev>[^/]+)"
_LFS_OID = r"(?P<oid>[0-9a-f]{64})"

# (route name used by `fail_next` and the log, path pattern, handler method per HTTP method)
_ROUTES = [
    ("whoami", r"/api/whoami-v2", {"GET": "whoami"}),
    ("validate_yaml", r"/api/validate-yaml", {"POST": "validate_yaml"}),
    ("create_repo", r"/api/repos/create", {"POST": "create_repo"}),
    ("delete_repo", r"/api/repos/delete", {"DELETE": "delete_repo"}),
    ("repo_info", rf"/api/{_TYPE}/{_REPO}(?:/revision/{_REV})?", {"GET": "repo_info"}),
    ("tree", rf"/api/{_TYPE}/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", {"GET": "tree"}),
    ("paths_info", rf"/api/{_TYPE}/{_REPO}/paths-info/{_REV}", {"POST": "paths_info"}),
    ("preupload", rf"/api/{_TYPE}/{_REPO}/preupload/{_REV}", {"POST": "preupload"}),
    ("commit", rf"/api/{_TYPE}/{_REPO}/commit/{_REV}", {"POST": "commit"}),
    ("list_commits", rf"/api/{_TYPE}/{_REPO}/commits/{_REV}", {"GET": "list_commits"}),
    ("list_refs", rf"/api/{_TYPE}/{_REPO}/refs", {"GET": "list_refs"}),
    ("branch", rf"/api/{_TYPE}/{_REPO}/branch/(?P<branch>[^/]+)", {"POST": "create_branch", "DELETE": "delete_branch"}),
    ("lfs_batch", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/batch", {"POST": "lfs_batch"}),
    ("lfs_upload", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/{_LFS_OID}", {"PUT": "lfs_upload"}),
    ("lfs_verify", rf"/{_PREFIX}{_REPO}\.git/info/lfs/objects/{_LFS_OID}/verify", {"POST": "lfs_verify"}),
    ("resolve", rf"/{_PREFIX}{_REPO}/resolve/{_REV}/(?P<path>.+)", {"GET": "resolve", "HEAD": "resolve"}),
]
_COMPILED_ROUTES = [(name, re.compile(pattern), handlers) for name, pattern, handlers in _ROUTES]
ROUTE_NAMES = frozenset(name for name, _, _ in _ROUTES)

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _match_route(path: str) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """The route a raw (percent-encoded) path belongs to, its decoded parameters and its handlers."""
    for name, pattern, handlers in _COMPILED_ROUTES:
        match = pattern.fullmatch(path)
        if match:
            params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            return name, params, handlers
    return None, {}, {}


def _slice_range(range_header: str | None, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """Serve a single ``Range: bytes=a-b`` (or ``a-``, ``-n``) as the Hub's CDN does; anything else whole."""
    match = _RANGE.fullmatch(range_header or "")
    if match is None or match.groups() == ("", ""):
        return 200, content
    size, (first, last) = len(content), match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        headers["Content-Range"] = f"bytes */{size}"
        return 416, b""
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return 206, content[start : end + 1]


class _PendingCommit:
    """The file map of a commit being built from its NDJSON lines; `_Reject` on a line the Hub refuses."""

    def __init__(self, repo: Repo, head: Commit):
        self.repo, self.head = repo, head
        self.files = dict(head.files)
        self.changed: list[str] = []
        self.deleted: list[str] = []

    def apply(self, key: str, value: dict) -> None:
        operations = {
            "file": self._add_file,
            "lfsFile": self._add_lfs_file,
            "deletedFile": self._delete_file,
            "deletedFolder": self._delete_folder,
        }
        if key == "header":
            return
        if key not in operations:
            raise _Reject(_error(400, f"Unknown commit operation '{key}'"))
        operations[key](value["path"].strip("/"), value)

    def _add_file(self, path: str, value: dict) -> None:
        """A regular file, inline: the Hub refuses binary or 10 MiB+ content there (it belongs in LFS)."""
        content = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
        if _must_use_lfs(len(content), content):
            raise _Reject(_error(400, f"Your push was rejected: '{path}' is binary or over 10 MiB, use LFS"))
        self.files[path] = Blob(content, lfs=False)
        self.changed.append(path)

    def _add_lfs_file(self, path: str, value: dict) -> None:
        """An LFS file, by sha256: the object must have been uploaded to this repo beforehand."""
        content = self.repo.lfs_objects.get(value["oid"])
        if content is None or value.get("size", len(content)) != len(content):
            raise _Reject(_error(400, f"LFS object {value['oid']} for '{path}' was never uploaded"))
        self.files[path] = Blob(content, lfs=True)
        self.changed.append(path)

    def _delete_file(self, path: str, value: dict) -> None:
        if self.files.pop(path, None) is None:
            raise _entry_not_found(self.head, f"A file with this name doesn't exist: {path}")
        self.deleted.append(path)

    def _delete_folder(self, path: str, value: dict) -> None:
        below = [name for name in self.files if name.startswith(path + "/")]
        if not below:
            raise _entry_not_found(self.head, f"A folder with this name doesn't exist: {path}")
        for name in below:
            del self.files[name]
        self.deleted.extend(below)


# --------------------------------------------------------------------------------------------------
# The Hub's behaviour, route by route
# --------------------------------------------------------------------------------------------------


class HubState:
    """All repos of one Hub, and the routes that read and change them. Not thread-safe on its own."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self._commit_salt = secrets.token_hex(8)  # commit ids never repeat, even across resets
        self._commit_counter = itertools.count()

    # --- helpers --------------------------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found()
        return repo

    def _request_repo(self, req: Request) -> Repo:
        return self.repo(req.repo_type, req.params["repo"])

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _revision_not_found(revision)
        return commit

    @staticmethod
    def _repo_url(base_url: str, repo: Repo) -> str:
        return f"{base_url}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _new_commit(self, parent: Commit | None, files: dict[str, Blob], message: str, description: str = "",
                    changed: tuple[str, ...] = (), deleted: tuple[str, ...] = ()) -> Commit:
        seed = f"{self._commit_salt}:{next(self._commit_counter)}:{parent.oid if parent else ''}:{message}"
        return Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent.oid if parent else None,
            message=message,
            description=description,
            date=_now(),
            files=files,
            changed=changed,
            deleted=deleted,
        )

    @staticmethod
    def _file_entry(path: str, blob: Blob) -> dict:
        """A file as the tree and paths-info routes list it."""
        entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
        return entry

    @staticmethod
    def _folder_entry(commit: Commit, folder: str) -> dict:
        """A folder; its id is derived from the ids of the files below it, as a git tree id would be."""
        below = sorted((path, blob.oid) for path, blob in commit.files.items() if path.startswith(folder + "/"))
        return {"type": "directory", "oid": hashlib.sha1(repr(below).encode()).hexdigest(), "size": 0, "path": folder}

    def _tree_entries(self, commit: Commit, folder: str, recursive: bool) -> list[dict] | None:
        """Entries under ``folder`` (files and sub-folders, direct children unless recursive); None if no folder."""
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                sub_folder = prefix + "/".join(parts[:depth])
                entries.setdefault(sub_folder, self._folder_entry(commit, sub_folder))
            if recursive or len(parts) == 1:
                entries[path] = self._file_entry(path, blob)
        if folder and not entries:
            return None
        return list(entries.values())

    # --- account ----------------------------------------------------------------------------------

    def whoami(self, req: Request) -> Response:
        """``HfApi.whoami``: any bearer token is a valid write token of `USER`."""
        if not req.headers.get("authorization", "").startswith("Bearer "):
            return _error(401, "Invalid credentials in Authorization header")
        return _json({
            "type": "user",
            "id": hashlib.sha1(USER.encode()).hexdigest()[:24],
            "name": USER,
            "fullname": "Stackwise Tester",
            "email": None,
            "emailVerified": True,
            "isPro": False,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
        })

    def validate_yaml(self, req: Request) -> Response:
        """``create_commit`` checks a README's metadata here first; this Hub finds nothing to object to."""
        return _json({"errors": [], "warnings": []})

    # --- repos ------------------------------------------------------------------------------------

    def create_repo(self, req: Request) -> Response:
        """``create_repo``: a new repo gets an "initial commit" holding the default `.gitattributes`.

        An existing repo answers 409, still with its "url": ``exist_ok=True`` relies on that.
        """
        payload = req.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        existing = self.repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._repo_url(req.base_url, existing)
            return _error(409, f"You already created this {repo_type} repo", url=url)
        private = payload.get("private") is True or payload.get("visibility") == "private"
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        initial = self._new_commit(None, {".gitattributes": Blob(_default_gitattributes(repo_type), lfs=False)},
                                   "initial commit", changed=(".gitattributes",))
        repo.commits[initial.oid] = initial
        repo.refs["refs/heads/main"] = initial.oid
        self.repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(req.base_url, repo), "name": repo_id, "id": repo_id})

    def delete_repo(self, req: Request) -> Response:
        """``delete_repo``: 404 RepoNotFound when there is nothing to delete (``missing_ok`` handles it)."""
        payload = req.json()
        key = (payload.get("type") or "model", f"{payload.get('organization') or USER}/{payload['name']}")
        if self.repos.pop(key, None) is None:
            raise _repo_not_found()
        return _json({})

    def repo_info(self, req: Request) -> Response:
        """``model_info``/``dataset_info``/``repo_info``: the commit id and the files (``siblings``).

        With ``blobs=true`` (``files_metadata=True``) each sibling also carries size, git id and LFS info.
        """
        repo = self._request_repo(req)
        commit = self._resolve(repo, req.params.get("rev", "main"))
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if req.flag("blobs"):
                sibling.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        return _json({
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "siblings": siblings,
        })

    def tree(self, req: Request) -> Response:
        """``list_repo_tree``/``list_repo_files``: entries under a folder, one page; 404 EntryNotFound if none."""
        commit = self._resolve(self._request_repo(req), req.params["rev"])
        entries = self._tree_entries(commit, req.params.get("path", "").strip("/"), req.flag("recursive"))
        if entries is None:
            raise _entry_not_found(commit)
        return _json(entries)

    def paths_info(self, req: Request) -> Response:
        """``get_paths_info``: the entries of the given paths (form field ``paths``); unknown paths are left out."""
        commit = self._resolve(self._request_repo(req), req.params["rev"])
        entries = []
        for path in parse_qs(req.body.decode()).get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(path, commit.files[path]))
            elif any(name.startswith(path + "/") for name in commit.files):
                entries.append(self._folder_entry(commit, path))
        return _json(entries)

    # --- refs and history -------------------------------------------------------------------------

    def list_refs(self, req: Request) -> Response:
        """``list_repo_refs``: branches, and pull requests when ``include_prs`` is set."""
        repo = self._request_repo(req)

        def refs(prefix: str) -> list[dict]:
            return [{"name": ref[len(prefix):], "ref": ref, "targetCommit": oid}
                    for ref, oid in repo.refs.items() if ref.startswith(prefix)]

        payload = {"branches": refs("refs/heads/"), "converts": [], "tags": []}
        if req.flag("include_prs"):
            payload["pullRequests"] = refs("refs/pr/")
        return _json(payload)

    def list_commits(self, req: Request) -> Response:
        """``list_repo_commits``: the history reachable from a revision, newest first, in one page."""
        repo = self._request_repo(req)
        self._resolve(repo, req.params["rev"])
        return _json([
            {"id": c.oid, "title": c.message, "message": c.description, "authors": [{"user": USER}], "date": c.date}
            for c in repo.history(req.params["rev"])
        ])

    def create_branch(self, req: Request) -> Response:
        """``create_branch``: from ``startingPoint`` (default main); 409 if the branch exists."""
        repo = self._request_repo(req)
        ref = f"refs/heads/{req.params['branch']}"
        if ref in repo.refs:
            return _error(409, f"Reference already exists: {ref}")
        repo.refs[ref] = self._resolve(repo, req.json().get("startingPoint") or "main").oid
        return _json({})

    def delete_branch(self, req: Request) -> Response:
        """``delete_branch``: main stays; an unknown branch is 404 RevisionNotFound."""
        repo = self._request_repo(req)
        branch = req.params["branch"]
        if branch == "main":
            return _error(403, "Cannot delete the default branch")
        if repo.refs.pop(f"refs/heads/{branch}", None) is None:
            raise _revision_not_found(branch)
        return _json({})

    # --- upload -----------------------------------------------------------------------------------

    def preupload(self, req: Request) -> Response:
        """Step 1 of every upload: per file, "lfs" or "regular", and the id of the file already there.

        "lfs" when the repo's `.gitattributes` routes the path to LFS (``*.safetensors``, ``*.bin``,
        ``*.pt``, ...), when the file is 10 MiB or more, or when its 512-byte sample holds a NUL byte
        (binary). The returned ``oid`` (sha256 for LFS, git id otherwise) lets the client skip unchanged files.
        """
        commit = self._resolve(self._request_repo(req), req.params["rev"])
        patterns = _lfs_patterns(commit.files.get(".gitattributes"))
        files = []
        for item in req.json()["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            lfs = _must_use_lfs(size, sample) or any(_matches(path, pattern) for pattern in patterns)
            existing = commit.files.get(path)
            files.append({
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": existing.etag if existing else None,
            })
        return _json({"files": files})

    def lfs_batch(self, req: Request) -> Response:
        """Step 2 for LFS files (git-lfs batch API): where to PUT each object, and a verify link.

        An object this repo already holds comes back without ``actions``: the client skips its upload.
        """
        repo = self._request_repo(req)
        payload = req.json()
        if payload.get("operation") != "upload":
            return _error(400, "This Hub only serves LFS uploads through the batch API")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in repo.lfs_objects:
                href = f"{self._repo_url(req.base_url, repo)}.git/info/lfs/objects/{item['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, req: Request) -> Response:
        """The PUT the batch answer pointed to (S3 on the real Hub): stores the object if its sha256 matches."""
        repo = self._request_repo(req)
        if hashlib.sha256(req.body).hexdigest() != req.params["oid"]:
            return _error(400, "The uploaded content does not match its sha256")
        repo.lfs_objects[req.params["oid"]] = req.body
        return Response(200)

    def lfs_verify(self, req: Request) -> Response:
        """The verify link of the batch answer: 404 unless the object arrived whole."""
        stored = self._request_repo(req).lfs_objects.get(req.params["oid"])
        if stored is None or len(stored) != req.json().get("size"):
            return _error(404, "Object not found")
        return _json({"success": True})

    def commit(self, req: Request) -> Response:
        """Step 3, ``create_commit``: an NDJSON body (``header``, then ``file`` / ``lfsFile`` /
        ``deletedFile`` / ``deletedFolder`` lines) applied all-or-nothing on a branch or PR ref.

        With ``create_pr=1`` the commit goes on a new ``refs/pr/<n>`` opened from the revision's head.
        An ``lfsFile`` whose object was never uploaded, a ``parentCommit`` that is not the head (412),
        or a deletion of a missing path reject the whole commit and change nothing.
        """
        repo = self._request_repo(req)
        revision = req.params["rev"]
        ref = repo.writable_ref(revision)
        if ref is None:
            raise _revision_not_found(revision)
        head = repo.commits[repo.refs[ref]]
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            return _error(400, "The commit payload has no header line")
        if header.get("parentCommit") not in (None, head.oid):
            return _error(412, "A commit has happened since. Please refresh and try again.")
        pending = _PendingCommit(repo, head)
        for line in lines:
            pending.apply(line["key"], line["value"])
        commit = self._new_commit(head, pending.files, header.get("summary", ""), header.get("description", ""),
                                  tuple(pending.changed), tuple(pending.deleted))
        repo.commits[commit.oid] = commit
        pr_url = None
        if req.flag("create_pr"):
            number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
            ref = f"refs/pr/{number}"
            pr_url = f"{self._repo_url(req.base_url, repo)}/discussions/{number}"
        repo.refs[ref] = commit.oid
        return _json({
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self._repo_url(req.base_url, repo)}/commit/{commit.oid}",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        })

    # --- download ---------------------------------------------------------------------------------

    def resolve(self, req: Request) -> Response:
        """HEAD/GET of a file at a revision (``hf_hub_download``, ``snapshot_download``, ``from_pretrained``).

        Headers: X-Repo-Commit (the resolved commit), ETag, Content-Length; LFS files add X-Linked-Etag
        (their sha256, which becomes the cache's blob name) and X-Linked-Size. The real Hub redirects LFS
        files to a CDN; here they are served in place. Single byte ranges are honoured (206).
        """
        repo = self._request_repo(req)
        commit = self._resolve(repo, req.params["rev"])
        path = req.params["path"]
        blob = commit.files.get(path)
        if blob is None:
            raise _entry_not_found(commit)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        status, body = _slice_range(req.headers.get("range"), blob.content, headers)
        return Response(status, body, headers, served_file=path)


# --------------------------------------------------------------------------------------------------
# The server: transport, request log, fault injection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it."""

    method: str
    path: str  # percent-decoded, without the query string
    route: str | None  # a name from ROUTE_NAMES, None if no route matched
    status: int
    repo_type: str | None
    repo_id: str | None
    file: str | None  # for resolve: the file path in the repo
    request_bytes: int  # size of the request body
    served_bytes: int  # file content bytes sent (resolve GETs)
    fault: bool  # answered by an injected fault
    error: str | None  # X-Error-Message of an error answer


@dataclass
class _Fault:
    route: str
    status: int
    remaining: int
    method: str | None
    path_contains: str | None

    def applies_to(self, route: str | None, method: str, path: str) -> bool:
        return (
            route == self.route
            and self.method in (None, method)
            and (self.path_contains is None or self.path_contains in path)
        )


class _Handler(BaseHTTPRequestHandler):
    # One request per connection: when `offline()` closes the port, no pooled connection survives it.
    protocol_version = "HTTP/1.0"
    timeout = 30

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.hub.handle(self.command, self.path, headers, self._read_body())
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format, *args) -> None:  # the request log replaces stderr chatter
        pass


class HubServer:
    """A Hub on ``http://127.0.0.1:<port>``: ``start()``/``stop()``, or use it as a context manager.

    The first ``start()`` binds a free port (or the one given); later starts rebind the same port,
    so ``url`` never changes and clients configured with it keep working after ``offline()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._address = (host, port)
        self._lock = threading.RLock()
        self._state = HubState()
        self._log: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._address
        if port == 0:
            raise RuntimeError("HubServer has no port yet: call start() first")
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        if self._httpd is None:
            httpd = ThreadingHTTPServer(self._address, _Handler)
            httpd.hub = self
            self._address = httpd.server_address[:2]
            self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"hub-server-{self._address[1]}", daemon=True)
            self._thread.start()
            self._httpd = httpd
        return self

    def stop(self) -> None:
        """Close the port: clients now get "connection refused". Repos and log are kept."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @contextmanager
    def offline(self):
        """A network outage for the duration of the block: the port refuses connections."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def reset(self) -> None:
        """Forget every repo, LFS object, logged request and pending fault."""
        with self._lock:
            self._state = HubState()
            self._log.clear()
            self._faults.clear()

    # --- fault injection --------------------------------------------------------------------------

    def fail_next(self, route: str, *, status: int = 500, times: int = 1, method: str | None = None,
                  path_contains: str | None = None) -> None:
        """Answer the next ``times`` requests of ``route`` with ``status``, without doing anything.

        ``route`` is one of `ROUTE_NAMES` ("commit", "preupload", "lfs_batch", "lfs_upload", "resolve",
        ...); ``method`` (e.g. "GET" to spare the HEAD of a download) and ``path_contains`` (e.g. a file
        name) narrow it down. A failed "lfs_upload" receives the whole body and stores none of it.

        huggingface_hub retries some failures with backoff (1 s, 2 s, 4 s, ...), which would absorb a
        one-shot 5xx: 408/429/5xx of preupload, LFS batch/upload/verify and tree listings, and the HEAD
        of a file that is not cached yet. Fail those with a 4xx status (or ``times`` > 5) to see an error.
        Commits and download GETs are not retried on 5xx.
        """
        if route not in ROUTE_NAMES:
            raise ValueError(f"Unknown route {route!r}; expected one of {sorted(ROUTE_NAMES)}")
        with self._lock:
            self._faults.append(_Fault(route, status, times, method, path_contains))

    def _take_fault(self, route: str | None, method: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.applies_to(route, method, path):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    # --- request handling -------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response:
        """Answer one request and log it (called from the server's threads)."""
        raw_path = urlsplit(target).path
        route, params, handlers = _match_route(raw_path)
        request = Request(method, raw_path, parse_qs(urlsplit(target).query), headers, body, params)
        with self._lock:
            fault = self._take_fault(route, method, unquote(raw_path))
            if fault is not None:
                response = _error(fault.status, f"Injected failure of route '{route}'")
            elif route is None:
                response = _error(404, "Not Found")
            elif method not in handlers:
                response = _error(405, "Method Not Allowed")
            else:
                response = self._call_route(handlers[method], request)
            self._log.append(self._record(request, route, response, fault is not None))
        return response

    def _call_route(self, handler: str, request: Request) -> Response:
        try:
            return getattr(self._state, handler)(request)
        except _Reject as reject:
            return reject.response
        except (KeyError, ValueError, TypeError) as exc:  # a payload the Hub would not accept
            return _error(400, f"Bad request: {type(exc).__name__}: {exc}")

    @staticmethod
    def _record(request: Request, route: str | None, response: Response, fault: bool) -> RequestRecord:
        served = response.served_file is not None and request.method == "GET"
        return RequestRecord(
            method=request.method,
            path=unquote(request.path),
            route=route,
            status=response.status,
            repo_type=request.repo_type if "repo" in request.params else None,
            repo_id=request.params.get("repo"),
            file=request.params.get("path") if route == "resolve" else None,
            request_bytes=len(request.body),
            served_bytes=len(response.body) if served else 0,
            fault=fault,
            error=response.headers.get("X-Error-Message") if response.status >= 400 else None,
        )

    # --- observation ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request since the last reset/clear_log, oldest first."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def downloaded_files(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Repo files whose content was sent (successful resolve GETs, not HEADs), in order, repeats kept."""
        return [
            record.file
            for record in self.requests
            if record.route == "resolve" and record.method == "GET" and record.status in (200, 206)
            and record.repo_id == repo_id and record.repo_type == repo_type
        ]

    @property
    def bytes_served(self) -> int:
        """File content bytes sent by resolve GETs."""
        return sum(record.served_bytes for record in self.requests)

    @property
    def bytes_received(self) -> int:
        """Request body bytes received (LFS uploads, commit payloads, API calls)."""
        return sum(record.request_bytes for record in self.requests)

    def commits(self, repo_id: str, *, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """The history reachable from ``revision``, newest first (the repo's "initial commit" last)."""
        with self._lock:
            repo = self._lookup(repo_type, repo_id)
            if repo.resolve(revision) is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return repo.history(revision)

    def file_bytes(self, repo_id: str, path: str, *, revision: str = "main", repo_type: str = "model") -> bytes:
        """The content of ``path`` at ``revision``; KeyError if the file or revision does not exist."""
        with self._lock:
            commit = self._lookup(repo_type, repo_id).resolve(revision)
            if commit is None or path not in commit.files:
                raise KeyError(f"{repo_id}@{revision} has no file {path!r}")
            return commit.files[path].content

    def lfs_objects(self, repo_id: str, repo_type: str = "model") -> dict[str, int]:
        """The LFS objects a repo holds: sha256 -> size (uploaded, committed or not)."""
        with self._lock:
            return {oid: len(data) for oid, data in self._lookup(repo_type, repo_id).lfs_objects.items()}

    def _lookup(self, repo_type: str, repo_id: str) -> Repo:
        try:
            return self._state.repo(repo_type, repo_id)
        except _Reject:
            raise KeyError(f"No {repo_type} repo {repo_id!r}") from None
