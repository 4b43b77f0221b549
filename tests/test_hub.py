"""Hub IO (stackwise_hf.hub) against the loopback Hub (tests/hub_server.py), with the real huggingface_hub,
transformers and peft clients: push and pull racks, single stacks, adapters, checkpoints; faults."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from hub_server import USER
from transformers import AutoModelForCausalLM

from stackwise_hf import CorruptFileError, ShapeMismatchError, StackWiseForCausalLM
from stackwise_hf.hub import (
    HubConnectionError,
    HubError,
    download_checkpoint,
    push_adapter_to_hub,
    push_checkpoint_to_hub,
    push_rack_folder_to_hub,
    resolve_checkpoint_location,
)
from stackwise_hf.model_card import render_card, rows_from_card, training_by_stack
from stackwise_hf.layout import INDEX_NAME, REMOTE_CODE_FILES
from stackwise_hf.stacks import rack_state_dict
from tiny import state_dicts_equal, tiny_rack, tokens

X = tokens()


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _head(hub, repo_id, revision="main"):
    return hub.commits(repo_id, revision=revision)[0]


def _files(hub, repo_id, revision="main"):
    return sorted(_head(hub, repo_id, revision).files)


def _tree_digest(path) -> dict[str, str]:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _adapted_rack(seed=0, **overrides):
    from stackwise_hf.adapters import add_stack_adapter

    overrides.setdefault("stack_sizes", [2, 1])
    rack = tiny_rack(seed, **overrides)
    add_stack_adapter(rack, 1, r=4, init_lora_weights=False)  # random B: the adapter changes the logits
    return rack.eval()


def _write_run(directory, stacks_tokens_losses):
    """A trainer-style run directory: log.jsonl (one stage per stack, appended) and a loss.png."""
    records, tokens_seen, sizes = [], 0, []
    for stage, (tokens_trained, eval_loss) in enumerate(stacks_tokens_losses):
        sizes.append(1)
        records.append({"kind": "stage_start", "step": stage, "stage": stage, "stack": stage, "stack_sizes": list(sizes)})
        tokens_seen += tokens_trained
        records.append({"kind": "train", "step": stage + 1, "stage": stage, "loss": 4.0, "tokens": tokens_seen})
        records.append({"kind": "stage_end", "step": stage + 1, "stage": stage, "stack": stage, "eval_loss": eval_loss})
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(directory, "loss.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return directory


# Push and pull a whole rack -----------------------------------------------------------------------------


def test_push_then_pull_rack_with_adapters_and_tokenizer_gives_identical_logits(hub_server, tmp_path):
    rack = _adapted_rack(stack_dtypes=["float32", "bfloat16"])
    run = _write_run(tmp_path / "run", [(384, 4.5), (512, 4.25)])
    info = rack.push_to_hub("rack", tokenizer=_tokenizer(), training_run=run, tags=["tiny"])
    repo_id = f"{USER}/rack"

    commit = _head(hub_server, repo_id)
    assert info.oid == commit.oid and len(hub_server.commits(repo_id)) == 2  # the Hub's initial commit + one push
    assert commit.message == "Upload rack: 2 stacks of [2, 1] blocks, adapters stack_1, tokenizer, modeling code"
    assert _files(hub_server, repo_id) == sorted([
        ".gitattributes", "README.md", "adapters/stack_1/adapter_config.json", "adapters/stack_1/adapter_model.safetensors",
        "adapters/stackwise_adapters.json", "config.json", "generation_config.json", "loss.png", "model-rack.safetensors",
        "model-stack000.safetensors", "model-stack001.safetensors", INDEX_NAME, "tokenizer.json", "tokenizer_config.json",
        *REMOTE_CODE_FILES,  # by default a rack carries its modeling code
    ])
    card = hub_server.file_bytes(repo_id, "README.md").decode()
    rows = rows_from_card(card)
    assert [(r["blocks"], r["dtype"], r["adapters"], r["tokens_trained"], r["eval_loss"]) for r in rows] == [
        (2, "float32", [], 384, 4.5), (1, "bfloat16", ["stack_1"], 512, 4.25)]
    assert rows[0]["parameters"] == rack.get_stack_info(0)["parameters"]
    assert "library_name: transformers" in card and "- stackwise_hf" in card and "- tiny" in card
    assert "| 1 | 1 | 9,280 | bfloat16 | stack_1 | 512 | 4.2500 |" in card and "![Training loss per stage](loss.png)" in card

    loaded = StackWiseForCausalLM.from_pretrained(repo_id).eval()
    assert loaded.config.stack_dtypes == ["float32", "bfloat16"] and sorted(loaded.peft_config) == ["stack_1"]
    torch.testing.assert_close(_logits(loaded), _logits(rack), rtol=0, atol=0)
    pinned = AutoModelForCausalLM.from_pretrained(repo_id, revision=info.oid).eval()
    assert type(pinned) is StackWiseForCausalLM
    torch.testing.assert_close(_logits(pinned), _logits(rack), rtol=0, atol=0)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(repo_id)("w5 w7").input_ids == [5, 7]


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
def test_a_rack_with_a_quantized_trunk_round_trips_through_the_hub(hub_server):
    from stackwise_hf.quantization import backend_available, quantize_stacks, quantized_stacks

    if backend_available("torchao"):
        pytest.skip(backend_available("torchao"))
    rack = tiny_rack(stack_sizes=[2, 1], hidden_size=64, intermediate_size=128)
    quantize_stacks(rack, [0], bits=8)
    from stackwise_hf.adapters import add_stack_adapter

    add_stack_adapter(rack, 1, r=4, init_lora_weights=False)
    rack.push_to_hub("quantized")
    repo_id = f"{USER}/quantized"
    assert {"quantization.json", "quantized-stack000.safetensors"} <= set(_files(hub_server, repo_id))

    pulled = tiny_rack(seed=9, stack_sizes=[2, 1], hidden_size=64, intermediate_size=128)
    assert pulled.load_rack(repo_id)
    assert sorted(quantized_stacks(pulled)) == [0]
    assert torch.equal(_logits(pulled), _logits(rack))
    # transformers alone loads the same repo as a plain rack: the stack's weights dequantized.
    plain = StackWiseForCausalLM.from_pretrained(repo_id).eval()
    assert not quantized_stacks(plain)
    assert (_logits(plain) - _logits(rack)).abs().max() < 1e-2


def test_push_updates_an_existing_repo_in_one_commit_dropping_stale_shards(hub_server):
    rack = tiny_rack(stack_sizes=[2, 1])
    rack.push_to_hub("rack", max_shard_size="8KB")
    repo_id = f"{USER}/rack"
    first = _files(hub_server, repo_id)
    assert sum(f.startswith("model-stack000-") for f in first) > 1

    rack.model.stacks[0].blocks[0].mlp.up_proj.weight.data += 1
    rack.push_to_hub(repo_id, commit_message="Bigger shards")
    commits = hub_server.commits(repo_id)
    assert [c.message for c in commits] == ["Bigger shards", "Upload rack: 2 stacks of [2, 1] blocks, modeling code",
                                            "initial commit"]
    assert [f for f in _files(hub_server, repo_id) if f.endswith(".safetensors")] == [
        "model-rack.safetensors", "model-stack000.safetensors", "model-stack001.safetensors"]
    assert set(commits[0].deleted) == {f for f in first if "-of-" in f}
    torch.testing.assert_close(_logits(StackWiseForCausalLM.from_pretrained(repo_id)), _logits(rack), rtol=0, atol=0)


def test_a_second_push_uploads_only_the_stacks_that_changed(hub_server):
    rack = tiny_rack(stack_sizes=[1, 1, 1])
    rack.push_to_hub("rack")
    repo_id = f"{USER}/rack"
    objects = set(hub_server.lfs_objects(repo_id))
    rack.model.stacks[1].blocks[0].mlp.up_proj.weight.data += 1
    hub_server.clear_log()
    rack.push_to_hub(repo_id)
    # The index changes with the stack: it records every file's sha256. Only the stack's shard is uploaded.
    assert _head(hub_server, repo_id).changed == ("model-stack001.safetensors", "model.safetensors.index.json")
    uploaded = [r for r in hub_server.requests if r.route == "lfs_upload"]
    assert len(set(hub_server.lfs_objects(repo_id)) - objects) == 1
    assert [r.request_bytes for r in uploaded] == [len(hub_server.file_bytes(repo_id, "model-stack001.safetensors"))]


def test_private_revision_create_pr_and_token_pass_through(hub_server):
    rack = tiny_rack()
    rack.push_to_hub("rack", private=True, token="hf_another_dummy")
    repo_id = f"{USER}/rack"
    main = _head(hub_server, repo_id).oid
    rack.model.norm.weight.data += 1
    rack.push_to_hub(repo_id, revision="dev")
    assert _head(hub_server, repo_id).oid == main and _head(hub_server, repo_id, "dev").oid != main
    info = rack.push_to_hub(repo_id, create_pr=True)
    assert info.pr_url.endswith("/discussions/1") and _head(hub_server, repo_id).oid == main
    pr = StackWiseForCausalLM.from_pretrained(repo_id, revision="refs/pr/1")
    torch.testing.assert_close(_logits(pr), _logits(rack), rtol=0, atol=0)
    from huggingface_hub import HfApi

    assert HfApi().repo_info(repo_id).private is True


def test_save_pretrained_push_to_hub_saves_locally_and_pushes(hub_server, tmp_path):
    rack = tiny_rack()
    rack.save_pretrained(tmp_path / "rack", push_to_hub=True, repo_id="pushed")
    assert (tmp_path / "rack" / INDEX_NAME).is_file()
    assert INDEX_NAME in _files(hub_server, f"{USER}/pushed")


# One stack --------------------------------------------------------------------------------------------


def test_push_a_second_stack_into_an_existing_repo_then_replace_a_stack(hub_server):
    rack = tiny_rack(stack_sizes=[2])
    rack.push_to_hub("growing")
    repo_id = f"{USER}/growing"
    rack.append_stack(1, init="random")
    info = rack.push_stack_to_hub(1, repo_id)
    commit = _head(hub_server, repo_id)
    assert info.oid == commit.oid and commit.message.startswith("Add stack 1: 1 block, float32")
    assert sorted(commit.changed) == ["README.md", "config.json", "model-stack001.safetensors", INDEX_NAME]
    assert commit.deleted == ()
    pulled = StackWiseForCausalLM.from_pretrained(repo_id)
    assert pulled.config.stack_sizes == [2, 1]
    torch.testing.assert_close(_logits(pulled), _logits(rack), rtol=0, atol=0)

    rack.cast_stack(0, "bfloat16")
    rack.push_stack_to_hub(0, repo_id, max_shard_size="8KB")
    commit = _head(hub_server, repo_id)
    assert commit.message.startswith("Update stack 0: 2 blocks, bfloat16")
    assert commit.deleted == ("model-stack000.safetensors",)
    assert all(f.startswith("model-stack000-") for f in commit.changed if f.endswith(".safetensors"))
    pulled = StackWiseForCausalLM.from_pretrained(repo_id)
    assert pulled.config.stack_dtypes == ["bfloat16", "float32"]
    torch.testing.assert_close(_logits(pulled), _logits(rack), rtol=0, atol=0)
    index = json.loads(hub_server.file_bytes(repo_id, INDEX_NAME))
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in rack_state_dict(rack).values())
    assert [r["dtype"] for r in rows_from_card(hub_server.file_bytes(repo_id, "README.md").decode())] == ["bfloat16", "float32"]


def test_push_stack_refuses_a_stack_that_does_not_fit(hub_server):
    tiny_rack(stack_sizes=[2, 1]).push_to_hub("rack")
    repo_id = f"{USER}/rack"
    head = _head(hub_server, repo_id).oid
    with pytest.raises(ShapeMismatchError, match=r"stack 1 has 1 blocks; this rack's has 2"):
        tiny_rack(stack_sizes=[2, 2]).push_stack_to_hub(1, repo_id)
    with pytest.raises(ShapeMismatchError, match=r"`hidden_size` is 32; this rack has 64"):
        tiny_rack(stack_sizes=[2, 1], hidden_size=64).push_stack_to_hub(0, repo_id)
    with pytest.raises(IndexError, match=r"has stacks 0..1; stack 3 can replace one of them or be appended as stack 2"):
        tiny_rack(stack_sizes=[2, 1, 1, 1]).push_stack_to_hub(3, repo_id)
    with pytest.raises(FileNotFoundError, match=rf"{USER}/nowhere: no such repo"):
        tiny_rack().push_stack_to_hub(0, "nowhere")
    assert _head(hub_server, repo_id).oid == head


def test_load_stack_downloads_only_that_stacks_shards(hub_server):
    rack = tiny_rack(stack_sizes=[1, 2, 1, 1])
    rack.push_to_hub("four", max_shard_size="8KB")
    repo_id = f"{USER}/four"
    hub_server.clear_log()
    fresh = tiny_rack(seed=7, stack_sizes=[1, 2, 1, 1])
    assert fresh.load_stack(1, repo_id)
    index = json.loads(hub_server.file_bytes(repo_id, INDEX_NAME))
    stack_files = index["metadata"]["stacks"]["1"]["files"]
    assert len(stack_files) > 1
    assert sorted(hub_server.downloaded_files(repo_id)) == sorted([INDEX_NAME, *stack_files])
    assert state_dicts_equal(fresh.model.stacks[1].state_dict(), rack.model.stacks[1].state_dict())


# Adapters ---------------------------------------------------------------------------------------------


def test_one_adapter_round_trips_through_the_hub_and_loads_with_plain_peft(hub_server):
    from peft import PeftModel

    from stackwise_hf.adapter_files import load_adapters
    from stackwise_hf.adapters import adapter_names, add_stack_adapter
    from stackwise_hf.layout import ADAPTER_MANIFEST as MANIFEST_PATH

    rack = _adapted_rack(stack_sizes=[1, 1])
    add_stack_adapter(rack, 0, r=2, init_lora_weights=False)
    base = tiny_rack(stack_sizes=[1, 1])
    base.push_to_hub("adapters")
    repo_id = f"{USER}/adapters"
    info = push_adapter_to_hub(rack, "stack_1", repo_id)
    assert _head(hub_server, repo_id).message == "Upload adapter stack_1: stacks [1], ranks [4]"
    push_adapter_to_hub(rack, "stack_0", repo_id)
    manifest = json.loads(hub_server.file_bytes(repo_id, MANIFEST_PATH))
    assert [e["name"] for e in manifest["adapters"]] == ["stack_1", "stack_0"]
    assert info.oid != _head(hub_server, repo_id).oid

    from stackwise_hf.adapters import activate_adapters

    activate_adapters(rack, "stack_1")
    hub_server.clear_log()
    fresh = tiny_rack(stack_sizes=[1, 1])
    assert load_adapters(fresh, repo_id, names=["stack_1"]) == ["stack_1"]
    assert sorted(hub_server.downloaded_files(repo_id)) == [
        "adapters/stack_1/adapter_config.json", "adapters/stack_1/adapter_model.safetensors", MANIFEST_PATH]
    assert adapter_names(fresh) == ["stack_1"]
    torch.testing.assert_close(_logits(fresh.eval()), _logits(rack), rtol=0, atol=0)

    peft_model = PeftModel.from_pretrained(tiny_rack(stack_sizes=[1, 1]), repo_id, subfolder="adapters/stack_1",
                                           adapter_name="stack_1").eval()
    torch.testing.assert_close(peft_model(input_ids=X).logits, _logits(rack), rtol=0, atol=0)

    with pytest.raises(ShapeMismatchError, match=r"adapts stack 1 of 2 blocks"):
        push_adapter_to_hub(_adapted_rack(stack_sizes=[1, 2]), "stack_1", repo_id)


# Checkpoints ------------------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_pushed_to_the_hub(hub_server, tmp_path):
    pytest.importorskip("datasets")
    from stackwise_hf.training import ProgressiveTrainer
    from tiny import synthetic_blocks, tiny_experiment

    def trainer(name):
        return ProgressiveTrainer(tiny_experiment(tmp_path / name, [{"max_steps": 2}]),
                                  train_dataset=synthetic_blocks(16), eval_dataset=synthetic_blocks(8, seed=1))

    source = trainer("a")
    source.setup()
    source.rack.model.stacks[0].blocks[0].mlp.up_proj.weight.data += 1  # differs from a fresh init
    checkpoint = os.path.dirname(source.save_rack_checkpoint(source.rack))
    before = _tree_digest(checkpoint)
    first = push_checkpoint_to_hub(checkpoint, "ckpt")
    repo_id = f"{USER}/ckpt"
    assert _head(hub_server, repo_id).message.startswith("Upload training checkpoint checkpoint-00000000 (")

    resumed = trainer("b")
    resumed.setup()
    local = resolve_checkpoint_location(repo_id)
    assert not any(os.path.islink(os.path.join(d, f)) for d, _, names in os.walk(local) for f in names)
    assert resumed.restore_from_checkpoint(local, resumed.rack)
    assert state_dicts_equal(resumed.rack.state_dict(), source.rack.state_dict())
    assert _tree_digest(checkpoint) == before

    # A second push replaces the folder's files; the first stays reachable by revision.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "only.json").write_text("{}")
    push_checkpoint_to_hub(tmp_path / "other", repo_id)
    assert _files(hub_server, repo_id) == [".gitattributes", "only.json"]
    again = resolve_checkpoint_location(f"{repo_id}@{first.oid}")
    assert _tree_digest(again) == before

    # The trainer takes the Hub location (repo@revision) where it takes a local checkpoint path.
    pinned = trainer("c")
    pinned.setup()
    assert pinned.restore_from_checkpoint(f"{repo_id}@{first.oid}", pinned.rack)
    assert state_dicts_equal(pinned.rack.state_dict(), source.rack.state_dict())


def test_checkpoint_in_a_subfolder_and_its_faults(hub_server, tmp_path):
    ckpt = tmp_path / "checkpoint-00000007"
    (ckpt / "rack").mkdir(parents=True)
    (ckpt / "rack" / "weights.safetensors").write_bytes(b"\0" * 1000)
    (ckpt / "manifest.json").write_text(json.dumps({"files": {"rack/weights.safetensors": {"size": 1000}}}))
    push_checkpoint_to_hub(ckpt, "ckpts", path_in_repo="runs/a")
    local = download_checkpoint(f"{USER}/ckpts", subfolder="runs/a", local_dir=tmp_path / "got")
    assert _tree_digest(local) == _tree_digest(ckpt)
    with pytest.raises(FileNotFoundError, match="no checkpoint files under 'runs/b'"):
        download_checkpoint(f"{USER}/ckpts", subfolder="runs/b")
    (ckpt / "rack" / "weights.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CorruptFileError, match="manifest.json says 1000; not pushing an incomplete checkpoint"):
        push_checkpoint_to_hub(ckpt, "ckpts", path_in_repo="runs/a")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory, nor a Hub location"):
        resolve_checkpoint_location("./nope")


# Code on the Hub --------------------------------------------------------------------------------------

_REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import sys

    # Hide stackwise_hf, peft and accelerate from every finder: importing them fails, and transformers'
    # availability checks (importlib.util.find_spec) report them missing, as where they are not installed.
    HIDDEN = {"stackwise_hf", "peft", "accelerate"}

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            find = getattr(self.finder, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, name):
            return getattr(self.finder, name)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    for name in HIDDEN:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"{name} is importable")

    import torch
    from transformers import AutoModelForCausalLM

    repo_id, expected = sys.argv[1], torch.load(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert not any(name.partition(".")[0] in HIDDEN for name in sys.modules)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
    print("REMOTE_CODE_OK", type(model).__module__)
""")


def test_trust_remote_code_loads_the_rack_without_the_package(hub_server, tmp_path):
    rack = tiny_rack(stack_sizes=[2, 1], stack_dtypes=["float32", "bfloat16"])
    rack.push_to_hub("remote-code")
    repo_id = f"{USER}/remote-code"
    shipped = sorted(f for f in _files(hub_server, repo_id) if f.endswith(".py"))
    assert shipped == sorted(REMOTE_CODE_FILES) == [
        "atomic.py", "checksums.py", "configuration_stackwise.py", "errors.py", "growth.py", "hub.py", "layout.py",
        "model_card.py",
        "modeling_stackwise.py", "rack.py", "rack_compat.py", "rack_files.py", "resolver.py", "serialization.py",
        "stacks.py"]
    config = json.loads(hub_server.file_bytes(repo_id, "config.json"))
    assert config["auto_map"] == {"AutoConfig": "configuration_stackwise.StackWiseConfig",
                                  "AutoModel": "modeling_stackwise.StackWiseModel",
                                  "AutoModelForCausalLM": "modeling_stackwise.StackWiseForCausalLM"}
    assert "custom_code" in ModelCard(hub_server.file_bytes(repo_id, "README.md").decode()).data.tags

    torch.save({"input_ids": X, "logits": _logits(rack)}, tmp_path / "expected.pt")
    script = tmp_path / "load_remote.py"
    script.write_text(_REMOTE_CODE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, str(script), repo_id, str(tmp_path / "expected.pt")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REMOTE_CODE_OK transformers_modules." in result.stdout


# Faults -----------------------------------------------------------------------------------------------


def test_a_repo_that_does_not_exist(hub_server):
    rack = tiny_rack()
    with pytest.raises(FileNotFoundError, match=rf"{USER}/missing: no such repo on the Hub"):
        rack.load_stack(0, f"{USER}/missing")
    with pytest.raises(OSError, match=rf"{USER}/missing"):
        StackWiseForCausalLM.from_pretrained(f"{USER}/missing")
    with pytest.raises(FileNotFoundError, match=rf"{USER}/missing: no such repo on the Hub"):
        download_checkpoint(f"{USER}/missing")


def test_a_server_error_mid_upload_leaves_the_remote_repo_and_the_local_files_as_they_were(hub_server, tmp_path):
    rack = _adapted_rack()
    rack.save_rack(tmp_path / "rack")
    push_rack_folder_to_hub(tmp_path / "rack", "rack")
    repo_id = f"{USER}/rack"
    head, files = _head(hub_server, repo_id).oid, _files(hub_server, repo_id)

    rack.model.stacks[0].blocks[0].mlp.up_proj.weight.data += 1
    rack.save_rack(tmp_path / "rack", max_shard_size="8KB")
    local = _tree_digest(tmp_path / "rack")
    # One shard's upload refused halfway through the others (403: not retried): the commit is never sent.
    hub_server.fail_next("lfs_upload", status=403, path_contains=_some_lfs_oid(tmp_path / "rack"))
    with pytest.raises(HubError, match=rf"Pushing to {USER}/rack@main failed .*403.*Nothing was committed: "
                                       rf"{USER}/rack@main is still at {head[:12]}\. The local files are untouched"):
        push_rack_folder_to_hub(tmp_path / "rack", repo_id)
    assert len(hub_server.lfs_objects(repo_id)) > 4  # uploaded objects stay unreferenced, as on the Hub
    # The commit itself refused (5xx on commits is not retried).
    hub_server.fail_next("commit", status=500)
    with pytest.raises(HubError, match=r"failed .*500.*Nothing was committed"):
        push_rack_folder_to_hub(tmp_path / "rack", repo_id)
    hub_server.fail_next("commit", status=500)
    with pytest.raises(HubError, match="Nothing was committed"):
        rack.push_stack_to_hub(0, repo_id)
    assert _head(hub_server, repo_id).oid == head and _files(hub_server, repo_id) == files
    assert _tree_digest(tmp_path / "rack") == local
    torch.testing.assert_close(_logits(StackWiseForCausalLM.from_pretrained(repo_id)), _logits(_adapted_rack()),
                               rtol=0, atol=0)


def _some_lfs_oid(directory) -> str:
    shard = sorted(f for f in os.listdir(directory) if f.startswith("model-stack000-"))[-1]
    return hashlib.sha256((directory / shard).read_bytes()).hexdigest()


def test_a_missing_stack_in_the_remote_index(hub_server):
    tiny_rack(stack_sizes=[2, 1]).push_to_hub("rack")
    repo_id = f"{USER}/rack"
    with pytest.raises(ShapeMismatchError, match=r"no stack 5 in the index \(it has \[0, 1\]\)"):
        tiny_rack(stack_sizes=[2, 1]).load_stack(1, repo_id, source_stack=5)
    rack = tiny_rack(stack_sizes=[2, 1, 1])
    before = {k: v.clone() for k, v in rack.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=r"no stack 2 in the index"):
        rack.load_stack(2, repo_id)
    assert state_dicts_equal(rack.state_dict(), before)


def test_a_network_that_is_down(hub_server):
    from stackwise_hf.adapter_files import load_adapters

    rack = tiny_rack()
    rack.push_to_hub("rack")
    repo_id = f"{USER}/rack"
    rack.load_stack(0, repo_id)  # now cached
    start = time.perf_counter()
    with hub_server.offline():
        with pytest.raises(HubConnectionError, match=rf"Cannot reach the Hub at {hub_server.url} \(preparing a push"):
            rack.push_to_hub("rack")
        with pytest.raises(HubConnectionError, match=r"Cannot fetch 'model-stack001.safetensors' of .*not in the local cache"):
            rack.load_stack(1, repo_id)
        assert rack.load_stack(0, repo_id)  # cached files still load
    assert time.perf_counter() - start < 10
    pulled = StackWiseForCausalLM.from_pretrained(repo_id)  # caches the rack, and that it has no adapters
    with hub_server.offline():
        with pytest.raises(FileNotFoundError, match=r"rack: no adapter manifest"):  # known absent, from the cache
            load_adapters(tiny_rack(), repo_id)
    if int(huggingface_hub.__version__.split(".")[0]) < 2:
        return  # 1.x retries transformers' HEAD of the absent model.safetensors for ~23 s before using the cache
    with hub_server.offline():
        torch.testing.assert_close(_logits(StackWiseForCausalLM.from_pretrained(repo_id)), _logits(pulled),
                                   rtol=0, atol=0)


def test_pulls_verify_hashes_and_sizes_of_cached_files(hub_server):
    rack = tiny_rack(stack_sizes=[2, 1])
    rack.push_to_hub("rack")
    repo_id = f"{USER}/rack"
    from huggingface_hub import hf_hub_download

    blob = os.path.realpath(hf_hub_download(repo_id, "model-stack001.safetensors"))
    data = bytearray(open(blob, "rb").read())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the sha256 can tell
    open(blob, "wb").write(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model-stack001.safetensors: the downloaded file .* has sha256"):
        tiny_rack(stack_sizes=[2, 1]).load_stack(1, repo_id)
    open(blob, "wb").write(bytes(data[:-100]))  # truncated
    with pytest.raises(CorruptFileError, match="model-stack001.safetensors"):
        StackWiseForCausalLM.from_pretrained(repo_id)
    assert tiny_rack(stack_sizes=[2, 1]).load_stack(1, repo_id, force_download=True)
    index = os.path.realpath(hf_hub_download(repo_id, INDEX_NAME))  # a regular (non-LFS) file: its git blob id
    open(index, "a").write(" ")
    with pytest.raises(CorruptFileError, match=rf"{INDEX_NAME}: the downloaded file .* has git blob id"):
        tiny_rack(stack_sizes=[2, 1]).load_stack(1, repo_id)


def test_a_push_that_raced_with_another_writer_is_refused(hub_server):
    from huggingface_hub import CommitOperationAdd

    from stackwise_hf import hub

    rack = tiny_rack()
    rack.push_to_hub("rack")
    repo_id = f"{USER}/rack"
    target = hub._open_target(repo_id, hub.PushOptions(), create=False)  # a push reads the head...
    rack.model.norm.weight.data += 1
    rack.push_to_hub(repo_id, commit_message="Another writer")  # ...someone else commits...
    with pytest.raises(HubError, match=r"412.*moved from .* to .* meanwhile"):  # ...and the push is refused
        hub._commit(target, [CommitOperationAdd("late.txt", b"late")], "Late push", hub.PushOptions())
    assert _head(hub_server, repo_id).message == "Another writer"


# CLI and card -----------------------------------------------------------------------------------------


def test_cli_push_of_a_run_output_directory(hub_server, tmp_path, capsys):
    from stackwise_hf.cli import main

    run = _write_run(tmp_path / "run", [(100, 3.5), (200, 3.25)])
    rack = tiny_rack(stack_sizes=[1, 1])
    rack.save_rack(run / "final")
    local = _tree_digest(run)
    assert main(["push", str(run / "final"), f"{USER}/cli", "--revision", "exp", "--commit-message", "From the CLI"]) == 0
    commit = _head(hub_server, f"{USER}/cli", "exp")
    assert commit.message == "From the CLI" and "loss.png" in commit.files
    rows = rows_from_card(hub_server.file_bytes(f"{USER}/cli", "README.md", revision="exp").decode())
    assert [(r["tokens_trained"], r["eval_loss"]) for r in rows] == [(100, 3.5), (200, 3.25)]
    assert _tree_digest(run) == local
    loaded = StackWiseForCausalLM.from_pretrained(f"{USER}/cli", revision="exp")
    torch.testing.assert_close(_logits(loaded), _logits(rack), rtol=0, atol=0)
    capsys.readouterr()
    assert main(["push", str(run), f"{USER}/cli"]) == 2  # the CLI reports a missing file as one line
    assert "model.safetensors.index.json" in capsys.readouterr().err


def test_card_keeps_user_edits_outside_its_section_and_tracks_prepends():
    rows = [{"stack": 0, "blocks": 2, "parameters": 10, "dtype": "float32", "adapters": [], "tokens_trained": 5,
             "eval_loss": 1.0}]
    card = render_card(rows, repo_id="me/r", config={"hidden_size": 8})
    edited = card.replace("# r\n", "# r\n\nHand-written intro.\n") + "\n## Citation\nPlease cite.\n"
    edited = edited.replace("tags:\n", "license: apache-2.0\ntags:\n- mine\n")
    rows[0]["eval_loss"] = 0.5
    again = render_card(rows, repo_id="me/r", config={"hidden_size": 8}, existing=edited)
    assert "Hand-written intro." in again and "Please cite." in again and "license: apache-2.0" in again
    assert "- mine" in again and again.count("## Stacks") == 1 and rows_from_card(again)[0]["eval_loss"] == 0.5

    log = [
        {"kind": "stage_start", "stage": 0, "stack": 0, "stack_sizes": [2]},
        {"kind": "train", "stage": 0, "tokens": 100},
        {"kind": "stage_end", "stage": 0, "stack": 0, "eval_loss": 3.0},
        {"kind": "stage_start", "stage": 1, "stack": 0, "stack_sizes": [1, 2]},  # prepended
        {"kind": "train", "stage": 1, "tokens": 250},
        {"kind": "stage_end", "stage": 1, "stack": 0, "eval_loss": 2.0},
    ]
    assert training_by_stack(log) == {0: {"tokens_trained": 150, "eval_loss": 2.0},
                                      1: {"tokens_trained": 100, "eval_loss": 3.0}}

