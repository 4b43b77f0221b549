"""Test-session setup: one thread, no network beyond loopback, a throwaway HF cache."""

import os
import tempfile

# Before transformers/huggingface_hub are imported by any test module: everything Hub-related points
# at a throwaway home, and Xet (which the loopback Hub server does not speak) is off.
_HF_HOME = tempfile.mkdtemp(prefix="stackwise-hf-home-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --- hub server (tests/hub_server.py) ---
# One loopback Hub for the whole session (see tests/hub_server.py). It starts here, at conftest import,
# because huggingface_hub reads HF_ENDPOINT once, when it is imported (its module-level HfApi keeps it),
# and transformers/peft go through huggingface_hub. Subprocesses inherit HF_ENDPOINT and reach it too.
import atexit  # noqa: E402
import sys  # noqa: E402

from hub_server import HubServer  # noqa: E402

assert "huggingface_hub" not in sys.modules, "huggingface_hub was imported before HF_ENDPOINT could be set"
_HUB = HubServer().start()
atexit.register(_HUB.stop)
os.environ["HF_ENDPOINT"] = _HUB.url
os.environ["HF_TOKEN"] = "hf_stackwise_dummy_token"  # any token is valid there; never a real one
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """The loopback Hub, emptied for this test, with an empty HF hub cache of the test's own.

    Yields the `HubServer`: its `url` is HF_ENDPOINT, so HfApi, hf_hub_download, snapshot_download,
    `push_to_hub` and `from_pretrained(repo_id)` all reach it. A test left offline is brought back online.
    """
    import huggingface_hub.constants

    cache = str(tmp_path / "hf-hub-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    _HUB.reset()
    yield _HUB
    _HUB.start()
# --- end hub server ---
