"""DoRA (`use_dora=True`) passes through to peft for stack and trunk adapters: training parameters, save,
load, merge, and the trainer's `stack_adapter` stage field."""

import json

import pytest
import torch
from peft.tuners.lora import LoraLayer

from stackwise_hf import StackWiseForCausalLM, adapters
from stackwise_hf.training import ProgressiveTrainer
from tiny import synthetic_blocks, tiny_experiment, tiny_rack, tokens

X = tokens()


def _logits(rack):
    with torch.no_grad():
        return rack(X).logits


def _dora_rack():
    """Stack 1 with a DoRA adapter, stack 0 with a DoRA trunk adapter; B random so both change the function."""
    rack = tiny_rack()
    adapters.add_stack_adapter(rack, 1, r=4, use_dora=True, init_lora_weights=False)
    adapters.add_trunk_adapter(rack, [0], r=2, use_dora=True, init_lora_weights=False)
    adapters.activate_adapters(rack, ["stack_1", "trunk"], trainable=["stack_1"])
    with torch.no_grad():  # a magnitude away from the weight norm it starts at, as after training
        for name, param in rack.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.5)
    return rack


def test_dora_adapters_are_peft_dora_layers_with_a_trainable_magnitude():
    rack = _dora_rack()
    layers = [m for m in rack.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.use_dora[name] for m in layers for name in m.lora_A)
    trainable = {n for n, p in rack.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector.stack_1" in n for n in trainable)
    assert not any(".trunk" in n for n in trainable)  # the trunk adapter is active but frozen
    assert rack.peft_config["stack_1"].use_dora and rack.peft_config["trunk"].use_dora


def test_dora_adapters_save_load_and_merge(tmp_path):
    rack = _dora_rack()
    expected = _logits(rack)
    rack.save_rack(tmp_path / "rack")
    assert json.loads((tmp_path / "rack" / "adapters" / "stack_1" / "adapter_config.json").read_text())["use_dora"]

    loaded = StackWiseForCausalLM.from_pretrained(tmp_path / "rack").eval()
    adapters.activate_adapters(loaded, ["stack_1", "trunk"])
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)

    for name in ("stack_1", "trunk"):
        adapters.merge_stack_adapter(loaded, name)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    # The merge folds magnitude and direction into one weight, so float32 rounds differently from the
    # unmerged forward (which scales the output), and by how much depends on the CPU's kernels: the largest
    # logit difference was 1.15e-5 on an Intel Xeon (about 260 float32 ulps of the largest logit, 0.37)
    # and under 1e-5 on an AMD EPYC. 1e-4 leaves ~9x room; a merge that dropped or misapplied the
    # magnitude would move logits by tenths.
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-4, atol=1e-4)


def test_a_stage_trains_a_dora_stack_adapter(tmp_path):
    stages = [{"max_steps": 2},
              {"grow": "append", "n_blocks": 1, "max_steps": 3, "train": ["stack_adapter", "head"],
               "stack_adapter": {"r": 4, "use_dora": True}}]
    trainer = ProgressiveTrainer(tiny_experiment(tmp_path, stages), train_dataset=synthetic_blocks(32),
                                 eval_dataset=synthetic_blocks(8, seed=1))
    trainer.train()
    assert trainer.rack.peft_config["stack_1"].use_dora
    saved = json.loads((tmp_path / "run" / "final" / "adapters" / "stack_1" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True


def test_use_dora_must_be_a_bool():
    with pytest.raises(ValueError, match=r"`use_dora` must be true or false; got 'yes'"):
        adapters.AdapterSettings(use_dora="yes")
