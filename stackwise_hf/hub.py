"""Hub IO: reading rack, stack and adapter files from a Hub repo (pushing is added with the Hub issue)."""

from __future__ import annotations

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .serialization import Resolver


def hub_resolver(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                 cache_dir: str | None = None, repo_type: str | None = None) -> Resolver:
    """A resolver that downloads one file of `repo_id` at `revision` on demand (through the HF cache,
    which verifies sizes and hashes), so reading one stack fetches only that stack's shards."""

    def resolve(filename: str) -> str:
        try:
            return hf_hub_download(
                repo_id, filename, revision=revision, token=token, cache_dir=cache_dir, repo_type=repo_type
            )
        except EntryNotFoundError as err:
            raise FileNotFoundError(f"{repo_id}@{revision or 'main'}: no file {filename!r} in the repo.") from err

    return resolve
