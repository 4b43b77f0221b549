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
