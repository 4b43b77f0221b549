"""lm-evaluation-harness evaluates a rack through its standard `hf` model type, offline: in-process (`HFLM`
over the model object) and by path with `trust_remote_code=True` (the `lm_eval` command in a fresh process,
which never imports stackwise_hf and loads the code the rack ships)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackwise_hf.data import train_bpe_tokenizer
from tiny import tiny_rack

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: the `eval` extra (.ci/run installs it)")

TEXTS = ["to be or not to be, that is the question", "whether tis nobler in the mind to suffer",
         "the slings and arrows of outrageous fortune"]
# A rolling-loglikelihood task (perplexity, like lm-eval's wikitext) over a local JSON file: nothing downloaded.
TASK_YAML = """\
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def rack_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    tokenizer = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    rack = tiny_rack(vocab_size=320, stack_sizes=[2, 1], stack_dtypes=["float32", "float32"],
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    rack.save_pretrained(root / "rack")  # with its modeling code, for trust_remote_code=True
    tokenizer.save_pretrained(root / "rack")
    (root / "tasks").mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (root / "tasks" / "tiny_rolling.yaml").write_text(TASK_YAML.format(data=root / "docs.jsonl"))
    return root, rack, tokenizer


def _expected_loglikelihood(rack, tokenizer) -> float:
    """The corpus log-likelihood computed directly: each text scored after the bos token."""
    total = 0.0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text).input_ids])
            logprobs = torch.log_softmax(rack(ids).logits[0, :-1].float(), dim=-1)
            total += logprobs.gather(1, ids[0, 1:, None]).sum().item()
    return total


def _word_perplexity(loglikelihood: float) -> float:
    return math.exp(-loglikelihood / sum(len(t.split()) for t in TEXTS))


def test_hflm_over_the_rack_object_scores_the_task(rack_dir, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root, rack, tokenizer = rack_dir
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = HFLM(pretrained=rack, tokenizer=tokenizer, device="cpu", batch_size=2)
    results = simple_evaluate(model=model, tasks=["tiny_rolling"], task_manager=TaskManager(include_path=str(root / "tasks")))
    scores = results["results"]["tiny_rolling"]
    # lm-eval's word perplexity is exp(-sum of log-likelihoods / words); float32 sums in another order.
    assert scores["word_perplexity,none"] == pytest.approx(_word_perplexity(_expected_loglikelihood(rack, tokenizer)),
                                                           rel=1e-4)


def test_lm_eval_command_loads_the_rack_by_path_with_trust_remote_code(rack_dir, tmp_path):
    root, rack, tokenizer = rack_dir
    cli = Path(sys.executable).parent / "lm_eval"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(cli), "--model", "hf", "--model_args", f"pretrained={root / 'rack'},trust_remote_code=True",
         "--tasks", "tiny_rolling", "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"]["tiny_rolling"]
    assert scores["word_perplexity,none"] == pytest.approx(_word_perplexity(_expected_loglikelihood(rack, tokenizer)),
                                                           rel=1e-4)
