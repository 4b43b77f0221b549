"""A quantized frozen trunk: LoRA trains on top, the trunk stays bit-unchanged, and the rack round-trips
through save/load bit for bit. torchao (int8) is what CI has; bitsandbytes (NF4, int8) runs where installed."""

import pytest
import torch

from stackwise_hf import adapters
from stackwise_hf.quantization import (
    backend_available,
    offload_stacks,
    quantize_stacks,
    quantized_stacks,
    resolve_backend,
    stream_stacks,
)
from stackwise_hf.rack_files import read_quantization_manifest as _read_manifest
from stackwise_hf.resolver import resolver_for

from tiny import tiny_rack, tokens

SHAPE = dict(stack_sizes=[2, 1], hidden_size=64, intermediate_size=128, stack_dtypes=["bfloat16", "bfloat16"])
BACKENDS = [
    pytest.param("torchao", 8, marks=pytest.mark.skipif(backend_available("torchao") is not None,
                                                       reason=str(backend_available("torchao")))),
    pytest.param("bitsandbytes", 4, marks=pytest.mark.skipif(backend_available("bitsandbytes") is not None,
                                                            reason=str(backend_available("bitsandbytes")))),
    pytest.param("bitsandbytes", 8, marks=pytest.mark.skipif(backend_available("bitsandbytes") is not None,
                                                            reason=str(backend_available("bitsandbytes")))),
]


def read_quantization_manifest(path):
    return _read_manifest(resolver_for(path))


# bitsandbytes' CPU NF4 path repacks a 4-bit weight on its first forward and computes with its block scales
# cast to bfloat16 (bitsandbytes/functional.py, `_convert_weight_packed_for_cpu`); which kernel a layer takes
# depends on the machine and on whether it has run a train-mode forward. So a reloaded NF4 rack may compute logits that differ from the live rack's by the
# rounding of those scales: measured up to ~3e-3 on logits of size ~0.3. Everything else round-trips exactly.
# The same repacking rewrites the layer's stored codes in place (packed data, bfloat16 block scales, no nested
# quantization) on the first forward in eval mode, so NF4 codes are compared only within one representation:
# the logits are what is checked across a save and a reload.
NF4_LOGIT_TOLERANCE = 1e-2


# After a resume from a checkpoint, trained weights follow gradients computed through that other kernel path:
# measured up to 8.3e-5 apart after 3 steps at lr 1e-3.
NF4_RESUME_TOLERANCE = 1e-3


def _codes_are_stable(backend, bits) -> bool:
    return (backend, bits) != ("bitsandbytes", 4)


def _assert_same_quantized_logits(actual, expected, bits, backend):
    if (backend, bits) == ("bitsandbytes", 4):
        torch.testing.assert_close(actual, expected, atol=NF4_LOGIT_TOLERANCE, rtol=0)
    else:
        assert torch.equal(actual, expected)


def _trunk_codes(rack, stack_idx):
    from stackwise_hf.quantization import PROJECTIONS, _codes

    out = {}
    for name, module in rack.model.stacks[stack_idx].named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            layer = getattr(module, "base_layer", module)
            out.update({f"{name}.{k}": v.detach().clone() for k, v in _codes(layer).items()})
    return out


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
@pytest.mark.parametrize("backend,bits", BACKENDS)
def test_lora_trains_over_a_quantized_trunk_and_round_trips(tmp_path, backend, bits):
    rack = tiny_rack(**SHAPE)
    ids = tokens(vocab=96)
    reference = rack(ids).logits
    record = quantize_stacks(rack, [0, 1], bits=bits, backend=backend)
    assert record == {i: {"bits": bits, "backend": backend, "scheme": "nf4" if bits == 4 else "int8"} for i in (0, 1)}
    assert (rack(ids).logits - reference).abs().max() < 0.2  # quantization error, not garbage
    trunk_before = _trunk_codes(rack, 0)

    adapters.add_stack_adapter(rack, 1, {"r": 4, "lora_alpha": 8})
    rack.requires_grad_(False)
    adapters.activate_adapters(rack, ["stack_1"], trainable=["stack_1"])
    trained = {n: p for n, p in rack.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    start = {n: p.detach().clone() for n, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-2)
    rack.train()
    losses = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = rack(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    rack.eval()
    assert losses[-1] < losses[0]
    assert any(not torch.equal(start[n], p) for n, p in trained.items())
    after = _trunk_codes(rack, 0)
    assert all(torch.equal(trunk_before[k], after[k]) for k in trunk_before)  # the trunk is bit-unchanged

    expected = rack(ids).logits
    rack.save_rack(tmp_path / "rack")
    assert read_quantization_manifest(tmp_path / "rack")[0]["bits"] == bits
    other = tiny_rack(seed=7, **SHAPE)
    other.load_rack(tmp_path / "rack")
    assert quantized_stacks(other) == record
    _assert_same_quantized_logits(other(ids).logits, expected, bits, backend)
    reloaded = _trunk_codes(other, 0)
    if _codes_are_stable(backend, bits):
        assert all(torch.equal(after[k], reloaded[k].to(after[k].device)) for k in after)
    # The directory is also a plain checkpoint: loads without quantization, close to the quantized rack.
    plain = tiny_rack(seed=7, **SHAPE)
    plain.load_rack_weights(tmp_path / "rack")
    assert not quantized_stacks(plain)


def test_missing_backend_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        resolve_backend(4, "auto")
    with pytest.raises(ValueError, match="bitsandbytes"):
        resolve_backend(4, "torchao")
    with pytest.raises(ValueError, match="8 or 4"):
        resolve_backend(3)


def test_trunk_off_the_device_streams_one_stack_at_a_time(monkeypatch):
    rack = tiny_rack(stack_sizes=[1, 1, 1])
    moves = []
    for i, stack in enumerate(rack.model.stacks):
        monkeypatch.setattr(stack, "to", lambda device, i=i, stack=stack: moves.append((i, str(device))) or stack)
    assert offload_stacks(rack, [0, 1]) == [0, 1]
    assert moves == [(0, "cpu"), (1, "cpu")]
    moves.clear()
    seen = []
    with stream_stacks(rack, [0, 1], "cuda") as stacks:
        for i, _ in stacks:
            seen.append((i, list(moves)))
    assert seen == [(0, [(0, "cuda")]), (1, [(0, "cuda"), (0, "cpu"), (1, "cuda")])]
    assert moves[-1] == (1, "cpu")


# The `trunk_quantization` stage field: the trainer quantizes the frozen trunk on stage entry ---------------

TORCHAO = pytest.mark.skipif(backend_available("torchao") is not None, reason=str(backend_available("torchao")))
SCHEMES = [
    pytest.param("int8", marks=TORCHAO),
    pytest.param("nf4", marks=pytest.mark.skipif(backend_available("bitsandbytes") is not None,
                                                 reason=str(backend_available("bitsandbytes")))),
]


SCHEMES_BITS = {"int8": 8, "nf4": 4}
# bitsandbytes quantizes in blocks of 64 input features: NF4 needs hidden and intermediate sizes it divides.
NF4_MODEL = {"hidden_size": 64, "intermediate_size": 128}


def _quantized_trainer(tmp_path, scheme: str, **training):
    from stackwise_hf.training import ProgressiveTrainer
    from tiny import synthetic_blocks, tiny_experiment

    stages = [
        {"max_steps": 3},
        {"grow": "append", "n_blocks": 1, "max_steps": 3, "trunk_quantization": scheme},
        {"grow": "append", "n_blocks": 1, "max_steps": 3, "trunk_quantization": scheme, "trunk_mode": "cache",
         "stack_adapter": {"r": 4}, "train": ["stack_adapter", "head"]},
    ]
    return ProgressiveTrainer(tiny_experiment(tmp_path, stages, model=NF4_MODEL if scheme == "nf4" else None, **training),
                              train_dataset=synthetic_blocks(32), eval_dataset=synthetic_blocks(8, seed=1))


def _plain_weights(rack):
    from stackwise_hf.quantization import quantized_state_dict

    return {k: v.clone() for k, v in quantized_state_dict(rack).items()}


@pytest.mark.filterwarnings("ignore:TorchaoLoraLinear was instantiated")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_trunk_quantization_stages_train_save_and_resume_exactly(tmp_path, scheme):
    from stackwise_hf import StackWiseForCausalLM
    from tiny import state_dicts_equal

    trainer = _quantized_trainer(tmp_path / "a", scheme)
    trainer.setup()
    codes = {}
    for stage in trainer.schedule:
        run = trainer.enter_stage(stage)
        if stage.index == 2:  # the stack quantized at stage 1 is still frozen, codes untouched
            assert sorted(quantized_stacks(trainer.rack)) == [0, 1]
            codes = _trunk_codes(trainer.rack, 0)
        trainer.run_stage(run)
        trainer.exit_stage(run)
    if _codes_are_stable("bitsandbytes" if scheme == "nf4" else "torchao", SCHEMES_BITS[scheme]):
        assert all(torch.equal(v, _trunk_codes(trainer.rack, 0)[k]) for k, v in codes.items())
    result = trainer.finish()
    assert sorted(read_quantization_manifest(result.output_dir)) == [0, 1]

    reloaded = StackWiseForCausalLM(trainer.rack.config.__class__.from_pretrained(result.output_dir))
    reloaded.load_rack(result.output_dir)
    ids = tokens(vocab=96)
    assert sorted(quantized_stacks(reloaded)) == [0, 1]
    _assert_same_quantized_logits(reloaded.eval()(ids).logits, trainer.rack.eval()(ids).logits, SCHEMES_BITS[scheme],
                                  "bitsandbytes" if scheme == "nf4" else "torchao")

    # Resuming from the end of stage 1 (trunk quantized) reaches the same weights bit for bit.
    stage_1 = next(c for c in trainer.list_checkpoints() if c["stage"] == 1 and c["kind"] == "stage_end")
    resumed = _quantized_trainer(tmp_path / "b", scheme, resume_from_checkpoint=stage_1["path"])
    resumed.train()
    assert sorted(quantized_stacks(resumed.rack)) == [0, 1]
    if _codes_are_stable("bitsandbytes" if scheme == "nf4" else "torchao", SCHEMES_BITS[scheme]):
        assert state_dicts_equal(_plain_weights(resumed.rack), _plain_weights(trainer.rack))
    else:  # the resumed trunk computes through the repacked kernel path (see NF4_LOGIT_TOLERANCE)
        a, b = _plain_weights(resumed.rack), _plain_weights(trainer.rack)
        assert a.keys() == b.keys()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst < NF4_RESUME_TOLERANCE


def test_nf4_over_widths_bitsandbytes_cannot_block_is_refused_before_training(tmp_path):
    from stackwise_hf.training import ProgressiveTrainer
    from tiny import synthetic_blocks, tiny_experiment

    stages = [{"max_steps": 1}, {"grow": "append", "n_blocks": 1, "max_steps": 1, "trunk_quantization": "nf4"}]
    trainer = ProgressiveTrainer(tiny_experiment(tmp_path, stages), train_dataset=synthetic_blocks(16),
                                 eval_dataset=synthetic_blocks(8, seed=1))
    with pytest.raises(ValueError, match=r"stage stage_1: `trunk_quantization: nf4` quantizes in blocks of 64 input "
                                         r"features \(bitsandbytes\); this rack's \{'hidden_size': 32, "):
        trainer.setup()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"max_steps": 1, "trunk_quantization": "int4"}], "`trunk_quantization`"),
        ([{"max_steps": 1}, {"grow": "append", "n_blocks": 1, "max_steps": 1, "trunk_quantization": "int8"},
          {"max_steps": 1, "stack": 0}], r"stages\[2\] \(stage_2\) trains stack 0, which an earlier stage quantized"),
        ([{"max_steps": 1}, {"grow": "append", "n_blocks": 1, "max_steps": 1, "trunk_quantization": "int8"},
          {"max_steps": 1, "train": ["all"]}], r"trains `all`, but stacks \[0\] are quantized"),
        ([{"max_steps": 1}, {"grow": "prepend", "n_blocks": 1, "max_steps": 1, "trunk_quantization": "nf4",
                             "trunk_adapter": {"r": 2}, "train": ["stack", "trunk_adapter"], "merge_adapters": True}],
         r"merge the trunk adapter.*stacks \[1\] are quantized"),
    ],
)
def test_schedules_that_would_train_or_merge_into_a_quantized_stack_are_refused(tmp_path, stages, message):
    from stackwise_hf.training import resolve_schedule
    from tiny import tiny_experiment

    with pytest.raises(ValueError, match=message):
        resolve_schedule(tiny_experiment(tmp_path, stages).stages, [1])


@TORCHAO
def test_merging_an_adapter_into_quantized_weights_is_refused():
    rack = tiny_rack(**SHAPE)
    adapters.add_trunk_adapter(rack, [0, 1], {"r": 2})
    quantize_stacks(rack, [0], bits=8)
    with pytest.raises(ValueError, match=r"adapter 'trunk' covers quantized stack\(s\) \[0\]"):
        adapters.merge_stack_adapter(rack, "trunk")
    assert "trunk" in adapters.adapter_names(rack)


@TORCHAO
@pytest.mark.parametrize("damage", ["truncate_codes", "delete_codes", "bad_manifest"])
def test_a_damaged_quantized_rack_fails_before_the_rack_changes(tmp_path, damage):
    from stackwise_hf.errors import CorruptFileError

    saved = tiny_rack(**SHAPE)
    quantize_stacks(saved, [0], bits=8)
    saved.save_rack(tmp_path)
    codes = tmp_path / "quantized-stack000.safetensors"
    if damage == "truncate_codes":
        codes.write_bytes(codes.read_bytes()[:-64])
    elif damage == "delete_codes":
        codes.unlink()
    else:
        (tmp_path / "quantization.json").write_text('{"stacks": {"0": {"bits": 3, "backend": "torchao"}}}')
    target = tiny_rack(seed=5, **SHAPE)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    error = {"truncate_codes": CorruptFileError, "delete_codes": FileNotFoundError, "bad_manifest": CorruptFileError}
    name = "quantization.json" if damage == "bad_manifest" else "quantized-stack000.safetensors"
    with pytest.raises(error[damage], match=name):
        target.load_rack(tmp_path)
    assert quantized_stacks(target) == {}
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
