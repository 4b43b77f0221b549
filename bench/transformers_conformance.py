"""Runs transformers' own common model and config tests against the rack classes.

    python bench/transformers_conformance.py [--keep DIR] [-- extra pytest args]

Downloads the transformers source distribution of exactly the installed version from the package
registry (`pip download --no-binary :all: --no-deps transformers==X`) into a temporary directory, takes
its `tests/test_modeling_common.py` and `tests/test_configuration_common.py`, and runs their
`ModelTesterMixin` / `ConfigTester` against `StackWiseModel` and `StackWiseForCausalLM` with a tester
written the way transformers' Llama tester is. Prints the counts and the name of every failed and
skipped test (with the skip reason). Nothing is copied into this repository. Needs `parameterized`
(a test dependency of transformers: `pip install parameterized`); not part of the default test run.

The source distribution does not ship three modules those files import; the harness provides them:
`exporters/test_export.py` (`ExportTesterMixin`: the export tests, an empty mixin), `generation/
test_utils.py` (`GenerationTesterMixin`: the generation tests, an empty mixin; generation is tested in
our own tests), and `utils/test_configuration_utils.py` (`config_common_kwargs`: common config keywords
with non-default values, written out below). transformers' in-tree models are found by class name in
its auto mappings; the harness adds the rack classes to those name tables, as an in-tree model would be.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree

import transformers

# Tests that fail by design, with why (also listed in docs/benchmarks.md).
EXPECTED_FAILURES = {
    "test_generation_tester_mixin_inheritance": "asks for GenerationTesterMixin, whose module the sdist does not ship "
    "(harness); generation is covered by tests/test_modeling*.py",
    "test_load_save_without_tied_weights": "expects one model.safetensors; a rack saves per-stack shard files "
    "with an index (intended: one stack loads on its own)",
}

TESTED_FILES = ("tests/test_modeling_common.py", "tests/test_configuration_common.py")

SHIMS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": '''config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "problem_type": "regression",
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "tokenizer_class": "BertTokenizerFast",
    "prefix": "prefix",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "task_specific_params": {"translation": "some_params"},
}
''',
}

# The tester and test case, written as transformers' Llama tests are (tests/models/llama, CausalLMModelTester).
TEST_MODULE = '''
import unittest

from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM, StackWiseModel

from .test_configuration_common import ConfigTester
from .test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask

# In-tree models are found by class name in these tables (labels for the causal-LM head, base model).
modeling_auto.MODEL_MAPPING_NAMES["stackwise"] = "StackWiseModel"
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["stackwise"] = "StackWiseForCausalLM"


class StackWiseModelTester:
    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 stack_sizes=(1, 1), num_attention_heads=4, num_key_value_heads=2, intermediate_size=37,
                 max_position_embeddings=512, initializer_range=0.02, pad_token_id=0):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.stack_sizes = list(stack_sizes)
        self.num_hidden_layers = sum(stack_sizes)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.pad_token_id = pad_token_id

    def get_config(self):
        return StackWiseConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, stack_sizes=list(self.stack_sizes),
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range, pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


@require_torch
class StackWiseModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (StackWiseModel, StackWiseForCausalLM)

    def setUp(self):
        self.model_tester = StackWiseModelTester(self)
        self.config_tester = ConfigTester(self, config_class=StackWiseConfig, hidden_size=36, num_attention_heads=2)

    def test_config(self):
        self.config_tester.run_common_tests()
'''


def download_sdist(version: str, where: str) -> str:
    """The path of transformers' source distribution of `version`, fetched from the package registry."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
         f"transformers=={version}", "-d", where],
        check=True,
    )
    (name,) = [n for n in os.listdir(where) if n.endswith(".tar.gz")]
    return os.path.join(where, name)


def build_test_package(sdist: str, root: str) -> str:
    """Writes `root/tf_tests/`: the two tested files from the sdist, the shims, and our test module."""
    package = os.path.join(root, "tf_tests")
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1]: m for m in archive.getmembers() if "/" in m.name}
        for path in TESTED_FILES:
            data = archive.extractfile(members[path]).read()
            _write(os.path.join(package, os.path.basename(path)), data.decode("utf-8"))
    for path, text in SHIMS.items():
        _write(os.path.join(package, path), text)
    _write(os.path.join(package, "test_stackwise_conformance.py"), TEST_MODULE)
    return package


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def run_tests(root: str, extra_args: list[str]) -> str:
    report = os.path.join(root, "report.xml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
         "--rootdir", root, os.path.join(root, "tf_tests", "test_stackwise_conformance.py"), *extra_args],
        cwd=root, env=env, check=False,
    )
    return report


def summarise(report: str) -> dict[str, list[tuple[str, str]]]:
    outcomes: dict[str, list[tuple[str, str]]] = {"passed": [], "failed": [], "skipped": []}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = case.get("name")
        failed = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failed is not None:
            outcomes["failed"].append((name, (failed.get("message") or "").splitlines()[0][:160]))
        elif skipped is not None:
            outcomes["skipped"].append((name, (skipped.get("message") or "")[:160]))
        else:
            outcomes["passed"].append((name, ""))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="build the test package in this directory and keep it")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    try:
        import parameterized  # noqa: F401  (imported by transformers' test files)
    except ImportError:
        sys.exit("transformers' test files need `parameterized`: pip install parameterized")
    root = args.keep or tempfile.mkdtemp(prefix="transformers-conformance-")
    os.makedirs(root, exist_ok=True)
    sdist = download_sdist(transformers.__version__, root)
    build_test_package(sdist, root)
    outcomes = summarise(run_tests(root, args.pytest_args))
    expected = [(n, EXPECTED_FAILURES[n]) for n, _ in outcomes["failed"] if n in EXPECTED_FAILURES]
    outcomes["failed"] = [(n, r) for n, r in outcomes["failed"] if n not in EXPECTED_FAILURES]
    outcomes["expected failures"] = expected
    print(f"\ntransformers {transformers.__version__}: " + ", ".join(f"{len(v)} {k}" for k, v in outcomes.items()))
    for kind in ("failed", "expected failures", "skipped"):
        for name, reason in sorted(outcomes[kind]):
            print(f"{kind.upper():8} {name}: {reason}")
    sys.exit(1 if outcomes["failed"] else 0)


if __name__ == "__main__":
    main()
