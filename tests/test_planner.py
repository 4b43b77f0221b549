"""The memory planner: parameter arithmetic on known shapes, saved-activation formula against autograd,
predicted peaks against measured ones on CPU, the shipped 70B/7B plans, and the CLI."""

import pytest
import torch

from stackwise_hf import StackWiseConfig, StackWiseForCausalLM
from stackwise_hf.quantization import backend_available
from stackwise_hf.planner import (
    MemoryMeter,
    PlanSettings,
    _block_saved_bytes,
    _Shape,
    block_parameters,
    format_plan,
    plan_experiment,
    plan_stage,
    rack_parameters,
)

LLAMA_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32)


def test_parameter_counts_match_llama_2():
    # Llama-2-70B has 68.98e9 parameters, Llama-2-7B 6.74e9 (untied head, 80 / 32 layers).
    assert rack_parameters(StackWiseConfig(**LLAMA_70B, stack_sizes=[80])) == 68_976_648_192
    assert rack_parameters(StackWiseConfig(**LLAMA_7B, stack_sizes=[32])) == 6_738_415_616
    config = StackWiseConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, stack_sizes=[2, 1])
    rack = StackWiseForCausalLM(config)
    assert rack_parameters(config) == sum(p.numel() for p in rack.parameters())
    assert block_parameters(config) == sum(p.numel() for p in rack.model.stacks[0].blocks[0].parameters())


@pytest.mark.parametrize("stack_dtype,autocast", [("float32", False), ("float32", True), ("bfloat16", True)])
@pytest.mark.parametrize("input_grad", [False, True])
def test_block_saved_bytes_equal_what_autograd_saves(stack_dtype, autocast, input_grad):
    config = StackWiseConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                             num_key_value_heads=2, stack_sizes=[1], stack_dtypes=[stack_dtype])
    rack = StackWiseForCausalLM(config).train()
    stack = rack.model.stacks[0]
    b, t = 2, 16
    hidden = torch.randn(b, t, 64, dtype=getattr(torch, stack_dtype), requires_grad=input_grad)
    attention = rack.model.attention_inputs(hidden)
    cos_sin = {t.untyped_storage().data_ptr() for t in attention["position_embeddings"]}
    skip = {p.untyped_storage().data_ptr() for p in rack.parameters()} | {hidden.untyped_storage().data_ptr()} | cos_sin
    seen = {}

    def pack(tensor):
        seen.setdefault(tensor.untyped_storage().data_ptr(), (tensor.untyped_storage().nbytes(), tensor.dim()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            stack(hidden, **attention)
    # Weight copies (2-D, weight-shaped) are accounted separately; so are cos/sin (per stack).
    copies = 2 * _Shape.of(config).linear_params if autocast and stack_dtype == "float32" else 0
    saved = sum(n for ptr, (n, _) in seen.items() if ptr not in skip) - copies
    if input_grad and stack_dtype == "float32":
        saved += b * t * 64 * 4  # the block input itself, kept by the norm (not a new tensor here)
    if stack_dtype != "float32":
        saved -= 2 * b * t * config.head_dim * 2  # cos/sin cast to the stack dtype
    sb = 4 if stack_dtype == "float32" else 2
    cb = 2 if autocast else sb
    expected = b * t * _block_saved_bytes(_Shape.of(config), sb, cb, autocast and sb == 4, True, input_grad)
    assert saved == expected


def _measure(case_fields, plan_fields, sizes, dtypes):
    from bench.planner_check import measure_stage, stage_of

    config = StackWiseConfig(vocab_size=512, hidden_size=128, intermediate_size=344, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, stack_sizes=sizes, stack_dtypes=dtypes)
    stage = stage_of(sizes, case_fields)
    settings = PlanSettings(micro_batch=2, seq_len=64, device_type="cpu", **plan_fields)
    predicted = plan_stage(config, stage, settings).peak
    measured = measure_stage(config, stage, settings, "cpu")["measured_peak"]
    return predicted, measured


@pytest.mark.parametrize("case_fields,plan_fields,sizes,dtypes", [
    ({"train": ["stack", "head"]}, dict(mixed_precision="bf16", loss_chunk_size=None), [1, 2], ["float32"] * 2),
    ({"train": ["stack", "head"], "trunk_mode": "cache"},
     dict(mixed_precision="bf16", loss_chunk_size=32, trunk_mode="cache", trunk_placement="host"),
     [1, 2], ["bfloat16"] * 2),
    pytest.param({"train": ["stack", "head"], "trunk_quantization": "int8"},
                 dict(mixed_precision="bf16", loss_chunk_size=32, trunk_precision="int8"),
                 [2, 2, 1], ["bfloat16", "bfloat16", "float32"],
                 marks=pytest.mark.skipif(backend_available("torchao") is not None,
                                          reason=str(backend_available("torchao")))),
    pytest.param({"train": ["stack", "head"], "trunk_quantization": "nf4"},
                 dict(mixed_precision="bf16", loss_chunk_size=32, trunk_precision="nf4"),
                 [2, 2, 1], ["bfloat16", "bfloat16", "float32"],
                 marks=pytest.mark.skipif(backend_available("bitsandbytes") is not None,
                                          reason=str(backend_available("bitsandbytes")))),
], ids=["recompute-full-logits", "cache-host-chunked", "int8-trunk-recompute", "nf4-trunk-recompute"])
def test_predicted_peak_within_ten_percent_of_measured_on_cpu(case_fields, plan_fields, sizes, dtypes):
    predicted, measured = _measure(case_fields, plan_fields, sizes, dtypes)
    assert abs(predicted - measured) / measured < 0.10, (predicted, measured)


def test_memory_meter_counts_live_storages():
    with MemoryMeter("cpu") as meter:
        x = torch.ones(256, 256)
        y = x.view(-1)  # a view: no new storage
        z = x * 2
        del x, y, z
    assert meter.peak == 2 * 256 * 256 * 4 and meter.current == 0


def test_shipped_llama_configs_fit_one_h200():
    for path in ("configs/llama-70b-stackwise.yaml", "configs/llama-7b-stackwise.yaml"):
        plan = plan_experiment(path, gpu_memory="141GB")
        assert plan.fits, format_plan(plan)
    plan = plan_experiment("configs/llama-70b-stackwise.yaml", gpu_memory="141GB")
    assert [sum(s.stack_sizes) for s in plan.stages] == list(range(4, 84, 4))
    # In cache mode the trunk is on the host: device peak does not grow with depth, host memory does.
    assert plan.stages[-1].peak == plan.stages[1].peak
    assert plan.stages[-1].host_bytes == 76 * block_parameters(StackWiseConfig(**LLAMA_70B, stack_sizes=[1])) * 2
    # Recomputing a bf16 trunk of 76 blocks does not fit; NF4 does.
    assert plan.variants["recompute:bfloat16"][-1] > plan.usable_memory
    assert plan.variants["recompute:nf4"][-1] <= plan.usable_memory


def test_stage_that_does_not_fit_gets_suggestions_that_do():
    plan = plan_experiment("configs/llama-70b-stackwise.yaml", gpu_memory="80GB",
                           micro_batch=8)
    bad = [s for s in plan.stages if not s.fits]
    assert bad and all(s.suggestions for s in bad)
    assert any("per_device_train_batch_size" in line for line in bad[0].suggestions)


def test_cli_plan(capsys):
    from stackwise_hf.cli import main

    assert main(["plan", "--config", "configs/llama-70b-stackwise.yaml", "--gpu-memory", "141GB"]) == 0
    out = capsys.readouterr().out
    assert "stack_19" in out and "NO" not in out.split("peak by trunk")[0]
    assert main(["plan", "--config", "configs/llama-70b-stackwise.yaml", "--gpu-memory", "40GB"]) == 1


def test_the_suggested_trunk_quantization_is_a_stage_field_the_planner_reads():
    from stackwise_hf.training import ExperimentConfig

    # What the planner suggests for a recomputed 70B trunk ("trunk_quantization: nf4") is a schedule a user can
    # write; planning that schedule gives the peak the suggestion promised.
    recompute = plan_experiment(ExperimentConfig.from_yaml("configs/llama-70b-stackwise.yaml",
                                                           overrides=["stages.*.trunk_mode=recompute"]),
                                gpu_memory="141GB")
    nf4 = plan_experiment(ExperimentConfig.from_yaml(
        "configs/llama-70b-stackwise.yaml",
        overrides=["stages.*.trunk_mode=recompute", "stages.*.trunk_quantization=nf4"]), gpu_memory="141GB")
    assert not recompute.fits and nf4.fits
    assert [s.peak for s in nf4.stages] == recompute.variants["recompute:nf4"]
