"""Per-stack LoRA adapters (stackwise_hf/adapters.py): targeting, training, merge, save/load, growth."""

import json
import os
import re

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from tiny import tiny_rack, tokens
from transformers import LlamaForCausalLM

from stackwise_hf import ShapeMismatchError, StackWiseModel
from stackwise_hf.adapter_files import load_adapters, save_adapters
from stackwise_hf.adapters import (
    PROJECTIONS,
    AdapterSettings,
    activate_adapters,
    active_adapters,
    adapter_names,
    adapter_report,
    add_stack_adapter,
    add_trunk_adapter,
    describe_adapter,
    format_adapter_report,
    freeze_base_weights,
    merge_stack_adapter,
    merged_adapters,
    remove_all_adapters,
    trainable_adapters,
)
from stackwise_hf.layout import ADAPTER_MANIFEST as MANIFEST_PATH
from stackwise_hf.llama_interop import to_llama
from stackwise_hf.stacks import is_adapter_key, rack_state_dict

X = tokens()
# Random (not zero) LoRA B matrices, so that every adapter changes the rack's function.
LIVE = {"init_lora_weights": False}


def three_stack_rack(seed=0, **overrides):
    return tiny_rack(seed, stack_sizes=[1, 2, 1], **overrides)


def with_adapters(seed=0, **overrides):
    """Stack adapters on stacks 1 and 2, a trunk adapter over stacks 0 and 1, all active."""
    rack = three_stack_rack(seed, **overrides)
    add_stack_adapter(rack, 1, **LIVE)
    add_stack_adapter(rack, 2, r=4, target="attention", **LIVE)
    add_trunk_adapter(rack, [0, 1], r=2, lora_alpha=4, **LIVE)
    return rack


def logits(rack):
    with torch.no_grad():
        return rack(X).logits


def adapted_modules(rack, name):
    return sorted(n for n, m in rack.named_modules() if hasattr(m, "lora_A") and name in m.lora_A)


def adapter_tensors(rack, name):
    return {k: v.detach().clone() for k, v in rack.state_dict().items() if f".{name}." in k and is_adapter_key(k)}


def base_tensors(rack):
    return {k: v.detach().clone() for k, v in rack_state_dict(rack).items()}


def exactly_equal(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def train(rack, steps=3, lr=1e-2):
    rack.train()
    # Every parameter goes to the optimizer: only `requires_grad` decides what gets a gradient and moves.
    optimizer = torch.optim.AdamW(rack.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = rack(X, labels=X).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    rack.eval()
    return losses


# Targeting -------------------------------------------------------------------------------------------


def test_adapters_target_exactly_their_stacks_modules():
    rack = with_adapters()
    blocks = {0: ["model.stacks.0.blocks.0"], 1: ["model.stacks.1.blocks.0", "model.stacks.1.blocks.1"],
              2: ["model.stacks.2.blocks.0"]}

    def expected(stacks, projections):
        parent = {p: "self_attn" if p in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for p in projections}
        return sorted(f"{block}.{parent[p]}.{p}" for i in stacks for block in blocks[i] for p in projections)

    assert adapted_modules(rack, "stack_1") == expected([1], PROJECTIONS)
    assert adapted_modules(rack, "stack_2") == expected([2], ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert adapted_modules(rack, "trunk") == expected([0, 1], PROJECTIONS)
    assert adapter_names(rack) == ["stack_1", "stack_2", "trunk"]
    assert [rack.get_stack_info(i)["adapters"] for i in range(3)] == [["trunk"], ["stack_1", "trunk"], ["stack_2"]]
    assert describe_adapter(rack, "trunk") == {
        "name": "trunk", "stacks": [0, 1], "target": list(PROJECTIONS), "r": [2, 2], "lora_alpha": [4, 4]
    }
    # The embeddings, norm and head are never adapted.
    assert all(".stacks." in n for n, _ in rack.named_parameters() if is_adapter_key(n))


def test_presets_and_a_bare_stackwise_model():
    model = StackWiseModel(three_stack_rack().config)
    add_stack_adapter(model, 0, target="mlp")
    add_stack_adapter(model, 2, target=["v_proj", "down_proj"])
    assert [m.rsplit(".", 1)[1] for m in adapted_modules(model, "stack_0")] == ["down_proj", "gate_proj", "up_proj"]
    assert adapted_modules(model, "stack_2") == [
        "stacks.2.blocks.0.mlp.down_proj", "stacks.2.blocks.0.self_attn.v_proj"
    ]


def test_rank_strategies():
    def ranks(**fields):
        settings = AdapterSettings.from_dict(fields)
        return [settings.rank_for(i) for i in range(4)]

    assert ranks(r=8, lora_alpha=16) == [(8, 16)] * 4
    assert ranks(r=4, lora_alpha=8, strategy="increasing", max_r=16) == [(4, 8), (8, 16), (16, 32), (16, 32)]
    assert ranks(r=16, lora_alpha=32, strategy="decreasing", min_r=2) == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert ranks(r=4, lora_alpha=8, strategy="increasing", step=3, scale_alpha=False) == [
        (4, 8), (12, 8), (36, 8), (108, 8)
    ]
    assert ranks(r=8, strategy="list", r_list=[2, 4, 6, 8], alpha_list=[1, 2, 3, 4.5]) == [
        (2, 1), (4, 2), (6, 3), (8, 4.5)
    ]
    assert ranks(r=8, lora_alpha=16, strategy="list", r_list=[2, 4, 6, 8]) == [(2, 4), (4, 8), (6, 12), (8, 16)]

    # The modules get those ranks, per stack also inside one trunk adapter (peft's rank_pattern).
    rack = three_stack_rack()
    add_trunk_adapter(rack, [0, 1, 2], r=2, lora_alpha=4, strategy="increasing")
    assert describe_adapter(rack, "trunk")["r"] == [2, 4, 8]
    assert describe_adapter(rack, "trunk")["lora_alpha"] == [4, 8, 16]
    assert rack.model.stacks[2].blocks[0].mlp.up_proj.lora_A["trunk"].weight.shape == (8, 32)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"strategy": "progressive"},
         r"`strategy` must be one of \['constant', 'increasing', 'decreasing', 'list'\]; got 'progressive'"),
        ({"r": 0}, r"`r` must be a positive integer; got 0"),
        ({"target": "attn"}, r"`target` must be one of \['attention', 'mlp', 'all-linear'\]"),
        ({"target": ["q_proj", "w1"]}, r"`target` lists must name some of"),
        ({"strategy": "list"}, r"`r_list` is given exactly when `strategy` is 'list'"),
        ({"init_lora_weights": "pissa"},
         r"`init_lora_weights` must be one of \[True, False, 'gaussian'\]; got 'pissa'"),
        ({"max_r": 2, "min_r": 4}, r"`max_r` \(2\) must be at least `min_r` \(4\)"),
        ({"rank": 8}, r"Unknown adapter setting\(s\) \['rank'\]; allowed fields are \['r', "),
    ],
)
def test_invalid_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        AdapterSettings.from_dict(fields)


def test_list_strategy_needs_an_entry_per_stack():
    rack = three_stack_rack()
    with pytest.raises(ValueError, match=r"`r_list` has 2 entries; stack 2 needs one"):
        add_stack_adapter(rack, 2, strategy="list", r_list=[4, 4])


# What trains -----------------------------------------------------------------------------------------


def test_training_changes_only_the_trainable_active_adapters():
    rack = with_adapters()
    add_stack_adapter(rack, 0, **LIVE)
    assert freeze_base_weights(rack) == sum(p.numel() for p in rack_state_dict(rack).values())
    # stack_0 inactive; trunk active but not trained; stack_1 and stack_2 trained.
    activate_adapters(rack, ["stack_1", "stack_2", "trunk"], trainable=["stack_1", "stack_2"])
    assert active_adapters(rack) == ["stack_1", "stack_2", "trunk"]
    assert trainable_adapters(rack) == ["stack_1", "stack_2"]
    before = {n: adapter_tensors(rack, n) for n in adapter_names(rack)}
    base = base_tensors(rack)

    train(rack)

    assert exactly_equal(base_tensors(rack), base)
    for name in ("stack_0", "trunk"):
        assert exactly_equal(adapter_tensors(rack, name), before[name]), name
    for name in ("stack_1", "stack_2"):
        after = adapter_tensors(rack, name)
        assert all(not torch.equal(after[k], before[name][k]) for k in after), name


def test_inactive_adapters_do_not_take_part():
    rack = three_stack_rack()
    plain = logits(rack)
    add_stack_adapter(rack, 1, **LIVE)
    add_stack_adapter(rack, 2, **LIVE)
    both = logits(rack)
    assert not torch.allclose(both, plain)
    activate_adapters(rack, [])
    torch.testing.assert_close(logits(rack), plain, rtol=0, atol=0)
    activate_adapters(rack, "stack_1")
    only_1 = logits(rack)
    assert not torch.allclose(only_1, both) and not torch.allclose(only_1, plain)


def test_adding_an_adapter_keeps_base_trainability_and_other_adapters():
    rack = three_stack_rack()
    rack.freeze_stacks([0, 1])
    add_stack_adapter(rack, 1)
    activate_adapters(rack, ["stack_1"], trainable=[])
    add_stack_adapter(rack, 2)
    # peft's first injection would freeze every base weight and its second would deactivate stack_1.
    assert rack.get_stack_info(2)["trainable"] and rack.model.embed_tokens.weight.requires_grad
    assert not rack.get_stack_info(0)["trainable"] and not rack.get_stack_info(1)["trainable"]
    assert active_adapters(rack) == ["stack_1", "stack_2"] and trainable_adapters(rack) == ["stack_2"]


def test_adapter_report_counts():
    rack = with_adapters()
    freeze_base_weights(rack)
    activate_adapters(rack, ["stack_1", "trunk"], trainable=["stack_1"])
    rows = adapter_report(rack)
    assert [r["part"] for r in rows] == ["stack 0", "stack 1", "stack 2", "embeddings/norm/head"]
    stack_1 = rows[1]
    lora_1 = sum(v.numel() for v in adapter_tensors(rack, "stack_1").values())
    lora_trunk_1 = sum(v.numel() for k, v in adapter_tensors(rack, "trunk").items() if ".stacks.1." in k)
    assert stack_1["adapter"] == lora_1 + lora_trunk_1 and stack_1["trainable"] == lora_1
    assert stack_1["total"] == stack_1["base"] + stack_1["adapter"] and stack_1["adapters"] == ["stack_1", "trunk"]
    assert sum(r["trainable"] for r in rows) == sum(p.numel() for p in rack.parameters() if p.requires_grad)
    embeddings_norm_head = 96 * 32 * 2 + 32
    assert rows[3]["adapter"] == 0 and rows[3]["base"] == embeddings_norm_head
    lines = format_adapter_report(rows).splitlines()
    assert lines[0].split()[:3] == ["part", "base", "adapter"] and lines[-1].startswith("total")


def test_bf16_stack_adapter_trains_in_float32_and_base_stays_put():
    rack = three_stack_rack(stack_dtypes=["bfloat16", "float16", "float32"])
    add_stack_adapter(rack, 0, r=8)
    add_stack_adapter(rack, 1, r=8)
    freeze_base_weights(rack)
    assert {p.dtype for n, p in rack.named_parameters() if is_adapter_key(n)} == {torch.float32}
    assert rack.model.stacks[0].dtype == torch.bfloat16 and rack.model.stacks[1].dtype == torch.float16
    base = base_tensors(rack)
    losses = train(rack, steps=6, lr=1e-2)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert exactly_equal(base_tensors(rack), base)


# Merging ---------------------------------------------------------------------------------------------


def test_merge_matches_unmerged_and_exports_to_llama(tmp_path):
    rack = with_adapters()
    unmerged = logits(rack)
    for name in ("stack_1", "trunk", "stack_2"):
        record = merge_stack_adapter(rack, name)
        assert record["merged"] and name not in adapter_names(rack)
        torch.testing.assert_close(logits(rack), unmerged, rtol=1e-5, atol=1e-5)
    assert not hasattr(rack, "peft_config") and not any(is_adapter_key(n) for n, _ in rack.named_parameters())
    assert [type(rack.model.stacks[1].blocks[0].self_attn.q_proj)] == [torch.nn.Linear]
    assert [r["name"] for r in merged_adapters(rack)] == ["stack_1", "trunk", "stack_2"]

    llama = to_llama(rack)
    llama.save_pretrained(tmp_path / "llama")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(X).logits, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 3e-2), ("float16", 3e-3)])
def test_merge_in_a_low_precision_stack_keeps_its_dtype(dtype, tol):
    rack = three_stack_rack(stack_dtypes=["float32", dtype, "float32"])
    add_stack_adapter(rack, 1, **LIVE)
    unmerged = logits(rack)
    merge_stack_adapter(rack, "stack_1")
    assert {p.dtype for p in rack.model.stacks[1].parameters()} == {getattr(torch, dtype)}
    assert rack.config.stack_dtypes[1] == dtype
    torch.testing.assert_close(logits(rack), unmerged, rtol=tol, atol=tol)


def test_relora_cycle_merge_then_fresh_adapter(tmp_path):
    rack = with_adapters()
    merge_stack_adapter(rack, "stack_1")
    assert add_stack_adapter(rack, 1, **LIVE) == "stack_1"
    expected = logits(rack)
    rack.save_rack(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_PATH).read_text())
    entries = [(e["name"], e["merged"], e["folder"]) for e in manifest["adapters"]]
    assert entries == [("stack_1", True, None), ("stack_1", False, "stack_1"), ("stack_2", False, "stack_2"),
                       ("trunk", False, "trunk")]
    fresh = three_stack_rack(seed=9)
    fresh.load_rack(tmp_path)
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    assert [r["name"] for r in merged_adapters(fresh)] == ["stack_1"]


# Saving and loading ----------------------------------------------------------------------------------


def test_save_layout_is_peft_format(tmp_path):
    rack = with_adapters()
    activate_adapters(rack, ["stack_1", "trunk"], trainable=["trunk"])
    save_adapters(rack, tmp_path)
    assert sorted(os.listdir(tmp_path / "adapters")) == ["stack_1", "stack_2", "stackwise_adapters.json", "trunk"]
    for name in ("stack_1", "stack_2", "trunk"):
        assert sorted(os.listdir(tmp_path / "adapters" / name)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapters/trunk/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["inference_mode"] is True
    assert config["auto_mapping"]["base_model_class"] == "StackWiseForCausalLM"
    with safe_open(tmp_path / "adapters/stack_2/adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    assert keys[0] == "base_model.model.model.stacks.2.blocks.0.self_attn.k_proj.lora_A.weight" and len(keys) == 8
    manifest = json.loads((tmp_path / MANIFEST_PATH).read_text())
    assert manifest["format_version"] == 1
    assert [(e["name"], e["stacks"], e["r"], e["active"], e["trainable"]) for e in manifest["adapters"]] == [
        ("stack_1", [1], [8], True, False), ("stack_2", [2], [4], False, False), ("trunk", [0, 1], [2, 2], True, True)
    ]


def test_save_load_gives_identical_logits_with_several_adapters(tmp_path):
    rack = with_adapters()
    activate_adapters(rack, ["stack_1", "stack_2", "trunk"], trainable=["stack_2"])
    expected = logits(rack)
    save_adapters(rack, tmp_path)

    fresh = three_stack_rack()  # same seed: same base weights
    assert load_adapters(fresh, tmp_path) == ["stack_1", "stack_2", "trunk"]
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)
    for name in adapter_names(rack):
        assert exactly_equal(adapter_tensors(fresh, name), adapter_tensors(rack, name))
    assert active_adapters(fresh) == active_adapters(rack) and trainable_adapters(fresh) == ["stack_2"]
    # Loading adapters leaves base trainability alone.
    assert all(p.requires_grad for n, p in fresh.named_parameters() if not is_adapter_key(n))

    only = three_stack_rack()
    assert load_adapters(only, tmp_path, names=["stack_2"]) == ["stack_2"]
    assert adapter_names(only) == ["stack_2"]


def test_save_rack_load_rack_round_trip_into_a_fresh_rack(tmp_path):
    rack = with_adapters(stack_dtypes=["bfloat16", "float32", "float32"])
    train(rack, steps=2)
    expected = logits(rack)
    rack.save_rack(tmp_path)

    fresh = tiny_rack(seed=3)  # another layout ([2, 1]) and other weights
    fresh.load_rack(tmp_path)
    assert fresh.config.stack_sizes == [1, 2, 1] and adapter_names(fresh) == ["stack_1", "stack_2", "trunk"]
    assert fresh.model.stacks[0].dtype == torch.bfloat16
    torch.testing.assert_close(logits(fresh), expected, rtol=0, atol=0)

    # Loading a rack saved without adapters takes the adapters away.
    plain = three_stack_rack(seed=4)
    plain.save_rack(tmp_path / "plain")
    fresh.load_rack(tmp_path / "plain")
    assert adapter_names(fresh) == [] and not hasattr(fresh, "peft_config")
    torch.testing.assert_close(logits(fresh), logits(plain), rtol=0, atol=0)


def test_one_adapter_loads_with_plain_peft(tmp_path):
    rack = with_adapters()
    activate_adapters(rack, "stack_1")
    expected = logits(rack)
    rack.save_rack(tmp_path)

    peft_model = PeftModel.from_pretrained(
        three_stack_rack(), tmp_path, subfolder="adapters/stack_1", adapter_name="stack_1"
    ).eval()
    assert list(peft_model.peft_config) == ["stack_1"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=X).logits, expected, rtol=0, atol=0)


def test_resaving_after_a_merge_removes_the_merged_adapters_folder(tmp_path):
    rack = with_adapters()
    save_adapters(rack, tmp_path)
    merge_stack_adapter(rack, "stack_2")
    save_adapters(rack, tmp_path)
    assert sorted(os.listdir(tmp_path / "adapters")) == ["stack_1", "stackwise_adapters.json", "trunk"]
    manifest = json.loads((tmp_path / MANIFEST_PATH).read_text())
    assert [(e["name"], e["merged"], e["folder"]) for e in manifest["adapters"]][0] == ("stack_2", True, None)
    with pytest.raises(ValueError, match=r"no adapter\(s\) \['stack_2'\] to load \(\['stack_2'\] were merged"):
        load_adapters(three_stack_rack(), tmp_path, names=["stack_2"])


def test_save_rack_after_merging_every_adapter_drops_the_old_manifests_adapters(tmp_path):
    rack = with_adapters()
    rack.save_rack(tmp_path)
    for name in adapter_names(rack):
        merge_stack_adapter(rack, name)
    rack.save_rack(tmp_path)
    assert sorted(os.listdir(tmp_path / "adapters")) == ["stackwise_adapters.json"]
    fresh = three_stack_rack(seed=5)
    fresh.load_rack(tmp_path)
    assert adapter_names(fresh) == [] and [r["name"] for r in merged_adapters(fresh)] == ["stack_1", "stack_2", "trunk"]
    torch.testing.assert_close(logits(fresh), logits(rack), rtol=0, atol=0)


def test_load_from_a_hub_repo_fetches_only_the_asked_adapter(hub_server, tmp_path):
    from huggingface_hub import HfApi

    rack = with_adapters()
    rack.save_rack(tmp_path)
    api = HfApi()
    repo_id = api.create_repo("rack-with-adapters").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path)

    fresh = three_stack_rack()
    assert load_adapters(fresh, repo_id, names=["stack_2"]) == ["stack_2"]
    fetched = {f for f in hub_server.downloaded_files(repo_id) if f.startswith("adapters/")}
    assert fetched == {
        MANIFEST_PATH, "adapters/stack_2/adapter_config.json", "adapters/stack_2/adapter_model.safetensors"
    }
    fresh.load_rack(repo_id)
    torch.testing.assert_close(logits(fresh), logits(rack), rtol=0, atol=0)


# Growth ----------------------------------------------------------------------------------------------


def test_prepend_shifts_adapters_keeping_logits_and_weights():
    rack = with_adapters()
    activate_adapters(rack, ["stack_1", "trunk"], trainable=["trunk"])
    expected = logits(rack)
    weights = {n: adapter_tensors(rack, n) for n in adapter_names(rack)}

    assert rack.prepend_stack(1, init="identity") == 0

    assert adapter_names(rack) == ["stack_2", "stack_3", "trunk"]
    assert describe_adapter(rack, "stack_2")["stacks"] == [2] and describe_adapter(rack, "trunk")["stacks"] == [1, 2]
    assert active_adapters(rack) == ["stack_2", "trunk"] and trainable_adapters(rack) == ["trunk"]
    torch.testing.assert_close(logits(rack), expected, rtol=0, atol=0)

    def shifted(tensors, old, new):
        return {re.sub(r"stacks\.(\d+)", lambda m: f"stacks.{int(m[1]) + 1}", k).replace(f".{old}.", f".{new}."): v
                for k, v in tensors.items()}

    assert exactly_equal(adapter_tensors(rack, "stack_2"), shifted(weights["stack_1"], "stack_1", "stack_2"))
    assert exactly_equal(adapter_tensors(rack, "stack_3"), shifted(weights["stack_2"], "stack_2", "stack_3"))
    assert exactly_equal(adapter_tensors(rack, "trunk"), shifted(weights["trunk"], "trunk", "trunk"))
    # The new configs target the new places: a new stack_1 adapter is possible and lands on stack 1 only.
    add_stack_adapter(rack, 1)
    assert {m.split(".")[2] for m in adapted_modules(rack, "stack_1")} == {"1"}


# Bad input -------------------------------------------------------------------------------------------


def test_adapter_for_a_missing_stack_or_twice():
    rack = three_stack_rack()
    with pytest.raises(IndexError, match=r"stack index 7 does not exist; the rack has 3 stacks \(valid: 0..2\)"):
        add_stack_adapter(rack, 7)
    with pytest.raises(IndexError, match="stack index 5 does not exist"):
        add_trunk_adapter(rack, [0, 5])
    add_stack_adapter(rack, 1)
    with pytest.raises(ValueError, match=r"already has an adapter named 'stack_1' \(adapters: \['stack_1'\]\)"):
        add_stack_adapter(rack, -2)
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['stack_0'\]; the rack has \['stack_1'\]"):
        activate_adapters(rack, ["stack_0"])
    with pytest.raises(ValueError, match=r"`trainable` adapters \['trunk'\] are not among"):
        activate_adapters(rack, ["stack_1"], trainable=["trunk"])


def assert_unchanged(rack, expected_logits, expected_names):
    torch.testing.assert_close(logits(rack), expected_logits, rtol=0, atol=0)
    assert adapter_names(rack) == expected_names


def test_adapter_that_does_not_fit_raises_and_changes_nothing(tmp_path):
    wide = three_stack_rack(hidden_size=48, intermediate_size=96)
    add_stack_adapter(wide, 1, **LIVE)
    save_adapters(wide, tmp_path)
    rack = three_stack_rack()
    add_stack_adapter(rack, 2, **LIVE)
    before = logits(rack)
    message = r"adapter 'stack_1': tensor `model\.stacks\.1\.blocks\.0\..*` has shape \((8, 48|48, 8|96, 8|8, 96)\); "
    with pytest.raises(ShapeMismatchError, match=message + "this rack's module needs"):
        load_adapters(rack, tmp_path, replace=True)
    assert_unchanged(rack, before, ["stack_2"])


def test_manifest_naming_a_missing_folder_raises_and_changes_nothing(tmp_path):
    source = with_adapters()
    save_adapters(source, tmp_path)
    os.remove(tmp_path / "adapters/trunk/adapter_model.safetensors")
    rack = three_stack_rack()
    add_stack_adapter(rack, 0, **LIVE)
    before = logits(rack)
    with pytest.raises(FileNotFoundError, match=r"lists adapter 'trunk' in folder 'adapters/trunk', which is missing"):
        load_adapters(rack, tmp_path, replace=True)
    assert_unchanged(rack, before, ["stack_0"])
    with pytest.raises(FileNotFoundError, match=r"lists adapter 'trunk' in folder 'adapters/trunk'"):
        load_adapters(rack, tmp_path, names=["trunk"])
    assert_unchanged(rack, before, ["stack_0"])


def test_manifest_with_a_stack_the_rack_lacks_or_a_name_clash(tmp_path):
    source = with_adapters()
    save_adapters(source, tmp_path)
    small = tiny_rack(stack_sizes=[1, 2])
    message = r"adapter 'stack_2' targets stack\(s\) \[2\]; the rack has 2 stacks \(valid: 0..1\)"
    with pytest.raises(IndexError, match=message):
        load_adapters(small, tmp_path)
    assert adapter_names(small) == []

    rack = three_stack_rack()
    add_stack_adapter(rack, 1)
    with pytest.raises(ValueError, match=r"already has adapter\(s\) \['stack_1'\]; pass replace=True"):
        load_adapters(rack, tmp_path)
    message = r"no adapter\(s\) \['stack_9'\] to load; it lists \['stack_1', 'stack_2', 'trunk'\]"
    with pytest.raises(ValueError, match=message):
        load_adapters(rack, tmp_path, names=["stack_9"])
    assert adapter_names(rack) == ["stack_1"]
    with pytest.raises(FileNotFoundError, match="no adapter manifest"):
        load_adapters(rack, tmp_path / "adapters")


def test_remove_all_adapters_restores_plain_linears():
    rack = with_adapters()
    remove_all_adapters(rack)
    assert not hasattr(rack, "peft_config")
    assert all(type(m) is torch.nn.Linear for n, m in rack.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(rack), logits(three_stack_rack()), rtol=0, atol=0)


def test_adapters_added_to_a_rack_in_eval_mode_stay_in_eval_mode():
    rack = tiny_rack()  # in eval mode
    add_stack_adapter(rack, 1, {"r": 4, "lora_dropout": 0.5})
    assert not any(m.training for m in rack.modules())
    ids = tokens()
    assert torch.equal(rack(ids).logits, rack(ids).logits)  # no dropout
    rack.train()
    add_stack_adapter(rack, 0, {"r": 4, "lora_dropout": 0.5})
    assert all(m.training for m in rack.modules())
