"""Training FLOP accounting (`training/flops.py`) against hand counts, and the throughput records a run logs."""

import json
import math

import pytest

from stackwise_hf import adapters
from stackwise_hf.training import ProgressiveTrainer
from stackwise_hf.training.flops import peak_flops, stage_flops
from stackwise_hf.training.results import StageSummary
from tiny import synthetic_blocks, tiny_experiment, tiny_rack

# The tiny rack by hand: hidden 32, ffn 64, 4 query heads of 8 (d_attn 32), 2 key/value heads (k, v: 32 -> 16).
H, F, V, D_ATTN = 32, 64, 96, 32
BLOCK = H * H + 2 * H * 16 + H * H + 3 * H * F  # q, k, v, o, gate, up, down: 9216 matmul weights per block
HEAD = V * H
T = 16


def attention(layers: int) -> int:
    return layers * 4 * T * D_ATTN  # forward, per token: q k^T and the weighted sum of v


def test_the_weights_are_counted_as_the_rack_holds_them():
    flops = stage_flops(tiny_rack(), first_trained=1)
    assert flops.stack_weights == (2 * BLOCK, BLOCK)


def test_recompute_cache_and_a_frozen_trunk_by_hand():
    rack = tiny_rack()  # stacks [2, 1]
    rack.requires_grad_(False)
    rack.unfreeze_stacks([1])
    for p in rack.head_parameters():
        p.requires_grad_(True)
    trunk = T * (2 * 2 * BLOCK + attention(2))             # stack 0: forward only, under no_grad
    trained = T * (6 * BLOCK + 3 * attention(1))           # stack 1: forward + both backward matmuls
    head = (T - 1) * 6 * HEAD                              # causal LM: the last position predicts nothing
    recompute = stage_flops(rack, first_trained=1)
    assert recompute.block_flops(T) == trunk + trained + head == 1_914_880
    cached = stage_flops(rack, first_trained=1, trunk_cached=True)
    assert cached.block_flops(T) == trained + head
    assert cached.cache_build_flops([0], rows=10, block_size=T) == 10 * trunk
    assert cached.step_flops((8, T)) == 8 * (trained + head)
    checkpointed = stage_flops(rack, first_trained=1, checkpointed_stacks=[1])
    assert checkpointed.block_flops(T) == recompute.block_flops(T) + T * (2 * BLOCK + attention(1))


def test_lora_counts_what_it_computes_and_a_frozen_head_passes_the_gradient():
    rack = tiny_rack()
    rack.requires_grad_(False)
    adapters.add_stack_adapter(rack, 1, r=4, target="all-linear")
    adapters.activate_adapters(rack, ["stack_1"], trainable=["stack_1"])
    lora = 4 * ((H + H) + (H + 16) * 2 + (H + H) + (H + F) * 2 + (F + H))  # rank 4: r (in + out) per projection
    assert lora == 2048
    trunk = T * (2 * 2 * BLOCK + attention(2))
    stack = T * (4 * (BLOCK + lora) + 2 * lora + 3 * attention(1))  # base frozen: 4N; adapters trained: 6N
    head = (T - 1) * 4 * HEAD                                       # frozen, but the gradient goes through it
    assert stage_flops(rack, first_trained=1).block_flops(T) == trunk + stack + head
    adapters.activate_adapters(rack, [])  # an inactive adapter computes nothing
    only_head = stage_flops(rack, first_trained=1).block_flops(T)
    assert only_head == trunk + T * (4 * BLOCK + 3 * attention(1)) + head  # a frozen stack the gradient crosses


def test_end_to_end_is_six_n_plus_attention_and_masked_heads_see_every_position():
    rack = tiny_rack()  # every parameter trainable
    per_block = stage_flops(rack, first_trained=0, causal=False).block_flops(T)
    assert per_block == 6 * (T * 3 * BLOCK + T * HEAD) + 3 * T * attention(3)


def test_peak_table_matches_device_names():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some New Accelerator") is None and peak_flops(None) is None


def test_a_run_logs_flops_tokens_time_throughput_and_health(tmp_path):
    stages = [
        {"name": "s0", "train": ["stack", "head", "embeddings"], "max_steps": 4, "learning_rate": 1e-2},
        {"name": "s1", "grow": "append", "n_blocks": 1, "init": "identity", "max_steps": 6, "learning_rate": 1e-2,
         "trunk_mode": "cache"},
    ]
    experiment = tiny_experiment(tmp_path, stages, max_grad_norm=1e-3, per_device_train_batch_size=4)
    train = synthetic_blocks(40, length=T)
    trainer = ProgressiveTrainer(experiment, rack=tiny_rack(stack_sizes=[1]), train_dataset=train,
                                 eval_dataset=synthetic_blocks(8, length=T, seed=1))
    result = trainer.train()

    one_stack = T * (6 * BLOCK + 3 * attention(1)) + (T - 1) * 6 * HEAD  # both stages train one block + head
    cache_build = 40 * T * (2 * BLOCK + attention(1))                      # stage 1: stack 0 over every train row
    expected = 4 * 4 * one_stack + 6 * 4 * one_stack + cache_build
    assert trainer.state.flops == pytest.approx(expected, rel=1e-12)
    assert trainer.state.tokens_seen == (4 + 6) * 4 * T

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 5  # logging_steps=2: steps 2, 4 | 6, 8, 10
    for r in train_records:
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["seconds"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 1e-3  # measured before clipping to 1e-3
        assert 0 < r["lr"] <= 1e-2
        assert "mfu" not in r  # CPU: no known peak
    flops = [r["flops"] for r in train_records]
    assert flops == sorted(flops) and flops[-1] == pytest.approx(expected)
    assert [r["tokens"] for r in train_records] == [2 * 4 * T * k for k in range(1, 6)]
    # tokens/s and FLOPs/s come from the same window, so their ratio is the FLOPs per token of the stage.
    last = train_records[-1]
    assert last["flops_per_s"] / last["tokens_per_s"] == pytest.approx(one_stack / T, rel=1e-6)
    ends = [r for r in records if r["kind"] == "stage_end"]
    assert [e["tokens"] for e in ends] == [4 * 4 * T, 10 * 4 * T]
    assert ends[-1]["flops"] == pytest.approx(expected) and ends[0]["flops"] == pytest.approx(16 * one_stack)
    assert 0 < ends[0]["train_seconds"] < ends[1]["train_seconds"]
    assert result.stages[-1].flops == pytest.approx(expected)


def test_the_cli_stage_table_shows_tokens_and_flops():
    from stackwise_hf.cli import _stage_table

    row = StageSummary(stage=0, name="s0", stack=0, stack_sizes=[2], steps=3, first_loss=5.0, final_loss=4.0,
                       eval_loss=4.1, perplexity=60.3, seconds=1.5, tokens=12_288, flops=2.5e15)
    header, line = _stage_table([row]).splitlines()
    assert header.split()[-2:] == ["tokens", "PFLOP"]
    assert line.split()[-2:] == ["12,288", "2.5000"]


def test_grad_norm_is_logged_without_clipping(tmp_path):
    stages = [{"train": ["stack", "head", "embeddings"], "max_steps": 2, "learning_rate": 1e-2}]
    experiment = tiny_experiment(tmp_path, stages, max_grad_norm=None)
    trainer = ProgressiveTrainer(experiment, rack=tiny_rack(stack_sizes=[1]), train_dataset=synthetic_blocks(16),
                                 eval_dataset=synthetic_blocks(8, seed=1))
    trainer.train()
    norms = [r["grad_norm"] for r in trainer.run_log.history if r["kind"] == "train"]
    assert norms and all(math.isfinite(n) and n > 0 for n in norms)


def test_trackers_receive_throughput_and_health(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    stages = [{"train": ["stack", "head", "embeddings"], "max_steps": 4, "learning_rate": 1e-2}]
    experiment = tiny_experiment(tmp_path, stages, report_to="tensorboard")
    ProgressiveTrainer(experiment, rack=tiny_rack(stack_sizes=[1]), train_dataset=synthetic_blocks(16),
                       eval_dataset=synthetic_blocks(8, seed=1)).train()
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        accumulator = event_accumulator.EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/tokens_per_s", "train/flops_per_s", "train/grad_norm", "train/lr", "train/flops"} <= tags


def test_the_progress_bar_shows_throughput_and_health():
    from stackwise_hf.training.trainer import _postfix

    shown = _postfix({"loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12345.6, "flops_per_s": 2.5e13,
                      "mfu": 0.41})
    assert shown == {"loss": "3.250", "lr": "1.00e-03", "gnorm": "0.50", "tok/s": "12,346", "TFLOP/s": "25",
                     "mfu": "41.0%"}
