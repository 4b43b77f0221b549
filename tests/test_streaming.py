"""Streamed corpora (stackwise_hf/streaming.py): what the stream yields, how processes split it, the
shuffle buffer, the exact resume through a checkpoint, and the trainer with `data.streaming: true`."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from stackwise_hf.data import DataArguments, build_datasets, load_raw_datasets, train_bpe_tokenizer  # noqa: E402
from stackwise_hf.streaming import StreamStateError, TrainStream, eval_blocks  # noqa: E402
from stackwise_hf.training import ExperimentConfig, ProgressiveTrainer  # noqa: E402
from stackwise_hf.training.checkpoint_format import read_state, write_state  # noqa: E402

BLOCK = 16
ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("checkpoint_worker", ROOT / "tests/scripts/checkpoint_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _documents(n: int, tag: str = "") -> list[str]:
    return [f"Document {tag}{i}: to be, or not to be{'!' * (i % 3)}\nthat is question #{i}, café" for i in range(n)]


def _write(folder, name: str, kind: str, documents: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path = folder / f"{name}.txt"
        path.write_text("\n\n".join(documents), encoding="utf-8")  # one paragraph per document
    elif kind == "json":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    else:
        path = folder / f"{name}.parquet"
        datasets.Dataset.from_dict({"text": documents}).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(_documents(60), vocab_size=300)


def _corpus(tmp_path, kind="text", train_files=2, docs_per_file=40) -> dict:
    train = [_write(tmp_path / "train", f"part{k}", kind, _documents(docs_per_file, f"{k}-"))
             for k in range(train_files)]
    return {"train": train, "validation": _write(tmp_path / "validation", "valid", kind, _documents(20, "v"))}


def _args(files, **fields) -> DataArguments:
    fields = {"dataset": None, "data_files": files, "block_size": BLOCK, "streaming": True, "max_eval_blocks": 4,
              **fields}
    return DataArguments(**fields)


def _take(stream: TrainStream, n_batches: int) -> list[torch.Tensor]:
    """The next `n_batches` batches, across epoch ends."""
    out = []
    while len(out) < n_batches:
        for batch in stream.epoch_batches():
            out.append(batch["input_ids"])
            if len(out) == n_batches:
                break
    return out


def _epoch(stream: TrainStream) -> torch.Tensor:
    return torch.cat([b["input_ids"] for b in stream.epoch_batches()])


@pytest.mark.parametrize("kind", ["text", "json", "parquet"])
def test_unshuffled_stream_is_the_in_memory_packing(tmp_path, tokenizer, kind):
    files = _corpus(tmp_path, kind)
    streamed = TrainStream(_args(files, shuffle_buffer_size=0), tokenizer, batch_size=1)
    in_memory, evaluation = build_datasets(_args(files, streaming=False, max_eval_blocks=None), tokenizer)
    assert torch.equal(_epoch(streamed), in_memory[:]["input_ids"])
    assert streamed.epoch == 1  # the epoch ended; the next call reads the corpus again
    first_eval = torch.stack([b["input_ids"] for b in eval_blocks(_args(files), tokenizer)])
    assert torch.equal(first_eval, evaluation[:4]["input_ids"])


def test_a_folder_streams_like_its_files(tmp_path, tokenizer):
    files = _corpus(tmp_path, "text", train_files=1)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.txt").write_bytes(open(files["train"][0], "rb").read())
    (folder / "validation.txt").write_bytes(open(files["validation"], "rb").read())
    from_folder = TrainStream(_args(None, dataset=str(folder), shuffle_buffer_size=0), tokenizer, batch_size=1)
    from_files = TrainStream(_args(files, shuffle_buffer_size=0), tokenizer, batch_size=1)
    assert torch.equal(_epoch(from_folder), _epoch(from_files))


@pytest.mark.parametrize("train_files", [2, 1])  # whole shards per process, or every other document
def test_processes_read_disjoint_parts_that_cover_the_corpus(tmp_path, tokenizer, train_files):
    files = _corpus(tmp_path, "text", train_files=train_files, docs_per_file=80 // train_files)
    texts = []
    for rank in (0, 1):
        stream = TrainStream(_args(files), tokenizer, batch_size=2, rank=rank, world_size=2)
        texts.append([row["text"] for row in stream._reader.dataset])
    assert texts[0] and texts[1] and not set(texts[0]) & set(texts[1])
    everything = [t for k in range(train_files) for t in _documents(80 // train_files, f"{k}-")]
    assert sorted(texts[0] + texts[1]) == sorted(everything)


def test_shuffle_buffer_reorders_blocks_but_keeps_them(tmp_path, tokenizer):
    files = _corpus(tmp_path)
    ordered = _epoch(TrainStream(_args(files, shuffle_buffer_size=0), tokenizer, batch_size=1))
    shuffled = TrainStream(_args(files, shuffle_buffer_size=8), tokenizer, batch_size=1, seed=5)
    first = _epoch(shuffled)
    assert not torch.equal(first, ordered)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, ordered.tolist()))
    assert not torch.equal(_epoch(shuffled), first)  # each epoch draws anew


@pytest.mark.parametrize("batches_before", [3, 11])  # mid-epoch, and just past an epoch end (10 batches/epoch)
def test_resume_from_a_saved_position_continues_exactly(tmp_path, tokenizer, batches_before):
    files = _corpus(tmp_path)
    args = _args(files, shuffle_buffer_size=7)
    stream = TrainStream(args, tokenizer, batch_size=3, rank=1, world_size=2, seed=2)
    _take(stream, batches_before)
    write_state(tmp_path / "position", "process_1", stream.state_dict())  # as checkpoints store it
    uninterrupted = _take(stream, 12)

    resumed = TrainStream(args, tokenizer, batch_size=3, rank=1, world_size=2, seed=2)
    resumed.load_state_dict(read_state(tmp_path / "position", "process_1"))
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, _take(resumed, 12), strict=True))

    other_rank = TrainStream(args, tokenizer, batch_size=3, rank=0, world_size=2, seed=2)
    with pytest.raises(StreamStateError, match="'rank': 1.*'rank': 0"):
        other_rank.load_state_dict(read_state(tmp_path / "position", "process_1"))


def test_held_out_documents_are_chosen_by_their_text(tmp_path):
    path = _write(tmp_path, "corpus", "json", _documents(200))
    args = DataArguments(dataset=path, streaming=True, max_eval_blocks=2, validation_split_percentage=10, seed=3)
    raw = load_raw_datasets(args)
    train, held_out = [r["text"] for r in raw["train"]], [r["text"] for r in raw["validation"]]
    assert 5 < len(held_out) < 40 and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(_documents(200))
    assert held_out == [r["text"] for r in load_raw_datasets(args)["validation"]]
    other_seed = DataArguments(dataset=path, streaming=True, max_eval_blocks=2, validation_split_percentage=10, seed=4)
    assert held_out != [r["text"] for r in load_raw_datasets(other_seed)["validation"]]


@pytest.mark.parametrize("fields, message", [
    ({"max_eval_blocks": None}, "max_eval_blocks=None is invalid: expected an integer >= 1 with streaming=True"),
    ({"max_train_blocks": 8}, "max_train_blocks=8 is invalid: expected None with streaming=True"),
    ({"shuffle_buffer_size": -1}, "shuffle_buffer_size=-1 is invalid: expected an integer >= 0"),
])
def test_streaming_arguments_are_checked(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataArguments(streaming=True, **{"max_eval_blocks": 4, **fields})


def test_a_stream_shorter_than_a_batch_is_reported(tmp_path, tokenizer):
    files = _corpus(tmp_path, train_files=1, docs_per_file=2)
    stream = TrainStream(_args(files), tokenizer, batch_size=64)
    with pytest.raises(ValueError, match="fewer than one batch of 64 blocks of 16 tokens"):
        next(stream.epoch_batches())


# The trainer -------------------------------------------------------------------------------------------


def _experiment(tmp_path, files, stages=None, **training) -> ExperimentConfig:
    model = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 stack_sizes=[1], max_position_embeddings=64)
    fields = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  logging_steps=2, report_to="none", plot=False, seed=1, save_interval=3, save_total_limit=None)
    fields.update(training)
    stages = stages or [{"max_steps": 5, "train": ["stack", "head", "embeddings"], "learning_rate": 3e-3},
                        {"grow": "append", "n_blocks": 1, "max_steps": 4, "learning_rate": 2e-3}]
    data = dict(dataset=None, data_files=files, block_size=BLOCK, streaming=True, max_eval_blocks=4,
                shuffle_buffer_size=6)
    return ExperimentConfig.from_dict({"model": model, "data": data, "training": fields, "stages": stages})


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.rack.state_dict().items()}


def test_streamed_run_resumed_mid_stage_is_bit_identical(tmp_path, tokenizer):
    files = _corpus(tmp_path)
    reference = ProgressiveTrainer(_experiment(tmp_path / "a", files), tokenizer=tokenizer)
    reference.train()
    checkpoints = reference.list_checkpoints()
    mid_stage = next(c for c in checkpoints if c["stage_entered"] and c["stage"] == 0)
    assert (tmp_path / "a/run/checkpoints" / mid_stage["directory"].rsplit("/", 1)[-1] / "data/process_0.json").is_file()

    resumed = ProgressiveTrainer(_experiment(tmp_path / "b", files, resume_from_checkpoint=mid_stage["path"]),
                                 tokenizer=tokenizer)
    resumed.train()
    assert resumed.get_training_info()["resumed_from"] == mid_stage["directory"]
    expected = _weights(reference)
    assert all(torch.equal(expected[k], v) for k, v in _weights(resumed).items())
    assert resumed.documents is not None  # document-aware packing is on by default for a causal rack


def test_streamed_run_refuses_trunk_cache_and_epochs(tmp_path, tokenizer):
    files = _corpus(tmp_path, train_files=1, docs_per_file=10)
    cache = [{"max_steps": 2, "train": ["stack", "head", "embeddings"]},
             {"grow": "append", "n_blocks": 1, "max_steps": 2, "trunk_mode": "cache"}]
    with pytest.raises(ValueError, match="trunk_mode 'cache' stores the trunk's output per block of a dataset held"):
        ProgressiveTrainer(_experiment(tmp_path, files, stages=cache), tokenizer=tokenizer).train()
    epochs = [{"num_epochs": 1, "train": ["stack", "head", "embeddings"]}]
    with pytest.raises(ValueError, match="num_epochs=1 cannot be counted in steps; give the stage max_steps"):
        ProgressiveTrainer(_experiment(tmp_path, files, stages=epochs), tokenizer=tokenizer).train()


def test_a_streamed_run_does_not_resume_from_an_in_memory_checkpoint(tmp_path, tokenizer):
    from stackwise_hf.errors import CheckpointError

    files = _corpus(tmp_path, train_files=1, docs_per_file=30)
    stages = [{"max_steps": 3, "train": ["stack", "head", "embeddings"]}]
    in_memory = _experiment(tmp_path / "m", files, stages=stages, save_interval=2)
    in_memory.data.streaming, in_memory.data.max_eval_blocks = False, None
    trainer = ProgressiveTrainer(in_memory, tokenizer=tokenizer)
    trainer.train()
    path = trainer.list_checkpoints()[-1]["path"]
    with pytest.raises(CheckpointError, match="holds no streamed-data position for process 0"):
        ProgressiveTrainer(_experiment(tmp_path / "s", files, stages=stages, resume_from_checkpoint=path),
                           tokenizer=tokenizer).train()


def test_streamed_run_killed_inside_a_save_then_resumed_is_bit_identical(tmp_path):
    """`tests/scripts/checkpoint_worker.py --stream`: three stages over a streamed folder, killed with SIGKILL
    while it writes its third checkpoint, resumed from the latest one: the final weights equal those of an
    uninterrupted run bit for bit (the stream position, packer carry and shuffle buffer were restored)."""
    corpus = tmp_path / "corpus"
    _write(corpus, "train", "text", _documents(300))
    _write(corpus, "validation", "text", _documents(20, "v"))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts/checkpoint_worker.py"), str(out),
                                 "--stream", str(corpus), "--save-delay", "0.3"], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        reference = ProgressiveTrainer(worker.experiment(str(tmp_path / "reference"), "tiny", False, str(corpus)))
        reference.train()
        third_save, deadline = out / "checkpoints" / "checkpoint-00000008.tmp", time.monotonic() + 300
        while not third_save.is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.005)
        time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    resumed = ProgressiveTrainer(worker.experiment(str(out), "tiny", True, str(corpus)))
    resumed.train()
    assert resumed.get_training_info()["resumed_from"].endswith("checkpoint-00000006")
    assert worker.weights_sha256(resumed.rack) == worker.weights_sha256(reference.rack)


@pytest.mark.slow
def test_two_ddp_processes_stream_different_blocks_and_agree_on_weights(tmp_path):
    """`torchrun --nproc_per_node 2` on the CPU (gloo): each process trains on its own part of a streamed
    folder of two files (one file each): their documents are disjoint and together the corpus, and DDP
    leaves identical weights."""
    import socket

    import yaml

    corpus = tmp_path / "corpus"
    for k in range(2):
        _write(corpus / "train", f"part{k}", "text", _documents(120, f"{k}-"))
    _write(corpus / "validation", "valid", "text", _documents(20, "v"))
    document = {
        "model": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "stack_sizes": [1], "max_position_embeddings": 64},
        "data": {"dataset": str(corpus), "streaming": True, "block_size": BLOCK, "tokenizer_vocab_size": 300,
                 "max_eval_blocks": 4, "shuffle_buffer_size": 6, "cache_dir": str(tmp_path / "cache")},
        "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4, "logging_steps": 2,
                     "report_to": "none", "plot": False, "save_interval": None},
        "stages": [{"max_steps": 6, "train": ["stack", "head", "embeddings"]},
                   {"grow": "append", "n_blocks": 1, "max_steps": 4}],
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(document))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
           str(ROOT / "tests/scripts/ddp_worker.py"), str(tmp_path / "config.yaml"), str(tmp_path), "stream"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert len(ranks[0]["blocks"]) == len(ranks[1]["blocks"]) == 10 * 4  # (6 + 4 steps) x 4 blocks each
    texts = [r["texts"] for r in ranks]
    assert texts[0] and texts[1] and not set(texts[0]) & set(texts[1])
    assert sorted(texts[0] + texts[1]) == sorted(_documents(120, "0-") + _documents(120, "1-"))
