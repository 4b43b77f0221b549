"""The loopback Hub (tests/hub_server.py) against the real huggingface_hub, transformers and peft clients."""

import copy
import json
import time
import urllib.error
import urllib.request

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_server import USER, HubServer
from safetensors.torch import save_file

torch.set_num_threads(1)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _write_folder(root):
    """config.json, notes/readme.txt, weights/deep/model.safetensors (LFS by pattern)."""
    (root / "notes").mkdir(parents=True)
    (root / "weights" / "deep").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden": 16}))
    (root / "notes" / "readme.txt").write_text("stack-wise notes\n")
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(root / "weights" / "deep" / "model.safetensors"))
    return root


def _head(hub, repo_id, revision="main"):
    return hub.commits(repo_id, revision=revision)[0].oid


def _has_connect_error(exc):
    while exc is not None:
        if type(exc).__name__ == "ConnectError" or isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def test_standalone_server_context_manager():
    with HubServer() as hub:
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"{hub.url}/api/whoami-v2")
        assert excinfo.value.code == 401  # no token
        request = urllib.request.Request(f"{hub.url}/api/whoami-v2", headers={"Authorization": "Bearer x"})
        with urllib.request.urlopen(request) as response:
            assert json.load(response)["name"] == USER
        url = hub.url
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/api/whoami-v2", timeout=2)


def test_create_repo_new_and_existing(hub_server):
    api = HfApi()
    url = api.create_repo("tiny", private=True)
    assert url.repo_id == f"{USER}/tiny"
    assert api.create_repo(f"{USER}/tiny", exist_ok=True).repo_id == f"{USER}/tiny"
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(f"{USER}/tiny")
    assert excinfo.value.response.status_code == 409
    info = api.model_info(f"{USER}/tiny")
    assert info.private is True
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # the Hub's initial commit
    assert api.whoami()["name"] == USER
    api.create_repo("data", repo_type="dataset")
    assert api.dataset_info(f"{USER}/data").sha is not None
    api.delete_repo(f"{USER}/data", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(f"{USER}/data")


def test_upload_folder_with_subfolders_and_lfs(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("folder").repo_id
    folder = _write_folder(tmp_path / "folder")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add folder")

    assert info.oid == _head(hub_server, repo_id)
    assert set(api.list_repo_files(repo_id)) == {
        ".gitattributes", "config.json", "notes/readme.txt", "weights/deep/model.safetensors"
    }
    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(repo_id)}
    assert top == {
        ".gitattributes": "RepoFile", "config.json": "RepoFile", "notes": "RepoFolder", "weights": "RepoFolder"
    }
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True)}
    weights = (folder / "weights" / "deep" / "model.safetensors").read_bytes()
    assert tree["weights/deep/model.safetensors"].lfs.size == len(weights)
    assert tree["config.json"].lfs is None
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="weights")] == ["weights/deep"]
    assert hub_server.file_bytes(repo_id, "weights/deep/model.safetensors") == weights
    assert [r.route for r in hub_server.requests].count("lfs_upload") == 1
    newest = hub_server.commits(repo_id)[0]
    assert newest.message == "add folder"
    assert set(newest.changed) == {"config.json", "notes/readme.txt", "weights/deep/model.safetensors"}

    # Same folder again: preupload reports every file unchanged, so nothing is uploaded or committed.
    hub_server.clear_log()
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    routes = [r.route for r in hub_server.requests]
    assert "preupload" in routes and "lfs_upload" not in routes and "commit" not in routes
    assert len(hub_server.commits(repo_id)) == 2

    # The same weights under another name: the LFS object is already there, its upload is skipped.
    api.upload_file(path_or_fileobj=weights, path_in_repo="copy.safetensors", repo_id=repo_id)
    assert "lfs_upload" not in [r.route for r in hub_server.requests]
    assert hub_server.file_bytes(repo_id, "copy.safetensors") == weights


def test_downloads_by_revision_branch_and_patterns(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("revs").repo_id
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo_id).oid
    api.upload_folder(repo_id=repo_id, folder_path=_write_folder(tmp_path / "folder"))
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id=repo_id)
    api.create_branch(repo_id, branch="dev", revision=first)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id=repo_id, revision="dev")

    def read(**kwargs):
        with open(hf_hub_download(repo_id, "a.txt", **kwargs), "rb") as file:
            return file.read()

    assert read() == b"v2"
    assert read(revision=first) == b"v1"
    assert read(revision="dev") == b"dev"
    assert api.list_repo_files(repo_id, revision="dev") == [".gitattributes", "a.txt"]
    assert {b.name for b in api.list_repo_refs(repo_id).branches} == {"main", "dev"}
    assert [c.title for c in api.list_repo_commits(repo_id, revision="dev")] == [
        "Upload a.txt with huggingface_hub", "Upload a.txt with huggingface_hub", "initial commit"
    ]

    hub_server.clear_log()
    snapshot = snapshot_download(repo_id, allow_patterns=["*.json", "weights/*"])
    assert sorted(hub_server.downloaded_files(repo_id)) == ["config.json", "weights/deep/model.safetensors"]
    weights = (tmp_path / "folder" / "weights" / "deep" / "model.safetensors").read_bytes()
    with open(f"{snapshot}/weights/deep/model.safetensors", "rb") as file:
        assert file.read() == weights
    assert hub_server.bytes_served == len(weights) + len(json.dumps({"hidden": 16}))

    hub_server.clear_log()
    snapshot_download(repo_id, allow_patterns=["*.json", "weights/*"])  # all cached: nothing downloaded
    assert hub_server.downloaded_files(repo_id) == []
    old = snapshot_download(repo_id, revision=first)
    assert hub_server.downloaded_files(repo_id) == [".gitattributes"]  # a.txt@first came earlier
    with open(f"{old}/a.txt", "rb") as file:
        assert file.read() == b"v1"


def test_pull_requests_and_deletions(hub_server, tmp_path):
    api = HfApi()
    repo_id = api.create_repo("prs").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=_write_folder(tmp_path / "folder"))
    main_head = _head(hub_server, repo_id)

    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/discussions/1")
    assert _head(hub_server, repo_id) == main_head
    assert hub_server.file_bytes(repo_id, "pr.txt", revision="refs/pr/1") == b"proposal"
    with open(hf_hub_download(repo_id, "pr.txt", revision="refs/pr/1"), "rb") as file:
        assert file.read() == b"proposal"
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [ref.ref for ref in refs.pull_requests] == ["refs/pr/1"]

    api.delete_file("config.json", repo_id=repo_id)
    api.delete_folder("weights", repo_id=repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes", "notes/readme.txt"]
    assert hub_server.commits(repo_id)[1].deleted == ("config.json",)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "config.json")
    assert hf_hub_download(repo_id, "config.json", revision=main_head)  # history keeps it


def test_missing_repo_file_and_revision(hub_server):
    api = HfApi()
    repo_id = api.create_repo("errors").repo_id
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{USER}/nope", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="no-such-branch")
    assert hub_server.requests[-1].error.startswith("Invalid rev id")


def test_failing_commit_leaves_repo_unchanged(hub_server):
    api = HfApi()
    repo_id = api.create_repo("fail-commit").repo_id
    head = _head(hub_server, repo_id)
    hub_server.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert excinfo.value.response.status_code == 500
    assert _head(hub_server, repo_id) == head
    assert [r.route for r in hub_server.requests if r.fault] == ["commit"]
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)  # the fault was one-shot
    assert hub_server.file_bytes(repo_id, "x.txt") == b"x"


def test_failing_lfs_upload_creates_no_commit(hub_server):
    api = HfApi()
    repo_id = api.create_repo("fail-lfs").repo_id
    head = _head(hub_server, repo_id)
    weights = b"\x00weights" * 100
    hub_server.fail_next("lfs_upload", status=403)
    with pytest.raises((HfHubHTTPError, RuntimeError)) as excinfo:  # RuntimeError("Error while uploading ...")
        api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id)
    assert isinstance(excinfo.value, HfHubHTTPError) or isinstance(excinfo.value.__cause__, HfHubHTTPError)
    assert _head(hub_server, repo_id) == head
    assert hub_server.lfs_objects(repo_id) == {}
    assert "commit" not in [r.route for r in hub_server.requests]

    api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=repo_id)
    assert hub_server.file_bytes(repo_id, "model.safetensors") == weights


def test_failing_download(hub_server):
    api = HfApi()
    repo_id = api.create_repo("fail-resolve").repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    hub_server.fail_next("resolve", method="GET", status=500, path_contains="config.json")
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_hub_download(repo_id, "config.json")
    assert excinfo.value.response.status_code == 500
    assert hub_server.downloaded_files(repo_id) == []
    with open(hf_hub_download(repo_id, "config.json"), "rb") as file:
        assert file.read() == b"{}"
    assert hub_server.downloaded_files(repo_id) == ["config.json"]


def test_range_requests(hub_server):
    repo_id = HfApi().create_repo("ranges").repo_id
    HfApi().upload_file(path_or_fileobj=b"0123456789", path_in_repo="digits.txt", repo_id=repo_id)
    url = f"{hub_server.url}/{repo_id}/resolve/main/digits.txt"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=3-"})) as response:
        assert (response.status, response.read()) == (206, b"3456789")
        assert response.headers["Content-Range"] == "bytes 3-9/10"
    assert hub_server.bytes_served == 7


def test_network_down_fails_fast_and_recovers(hub_server):
    api = HfApi()
    repo_id = api.create_repo("offline").repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    cached = hf_hub_download(repo_id, "config.json")
    hub_server.clear_log()
    started = time.monotonic()
    with hub_server.offline():
        with pytest.raises(Exception) as excinfo:
            api.model_info(repo_id)
        assert _has_connect_error(excinfo.value)
        # The HEAD fails at once and the cached copy is served. (A file never downloaded would be
        # retried with backoff for ~23 s by huggingface_hub 2.x before LocalEntryNotFoundError.)
        assert hf_hub_download(repo_id, "config.json") == cached
    assert time.monotonic() - started < 5
    assert hub_server.requests == []  # nothing reached the server
    assert api.model_info(repo_id).sha == _head(hub_server, repo_id)  # back online, repos kept


def test_transformers_push_to_hub_and_from_pretrained(hub_server):
    from transformers import LlamaForCausalLM

    model = _tiny_llama()
    commit = model.push_to_hub("tiny-llama", commit_message="push tiny llama")
    repo_id = f"{USER}/tiny-llama"
    assert commit.oid == _head(hub_server, repo_id)
    assert {"config.json", "model.safetensors"} <= set(hub_server.commits(repo_id)[0].changed)
    [weights] = HfApi().get_paths_info(repo_id, ["model.safetensors"])
    assert weights.lfs is not None and weights.lfs.sha256 in hub_server.lfs_objects(repo_id)

    loaded = LlamaForCausalLM.from_pretrained(repo_id)
    assert {"config.json", "model.safetensors"} <= set(hub_server.downloaded_files(repo_id))
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)


def test_peft_adapter_in_a_subfolder(hub_server, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _tiny_llama()
    pristine = copy.deepcopy(base)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # non-zero, so that a load that silently fails would show
    peft_model.save_pretrained(tmp_path / "adapter")

    api = HfApi()
    repo_id = api.create_repo("tiny-lora").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "adapter", path_in_repo="adapters/stage-1")
    loaded = PeftModel.from_pretrained(pristine, repo_id, subfolder="adapters/stage-1")
    assert "adapters/stage-1/adapter_model.safetensors" in hub_server.downloaded_files(repo_id)
    expected = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    actual = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert expected.keys() == actual.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)
