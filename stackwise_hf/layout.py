"""Every name of the on-disk formats, in one place: file and folder names, key conventions, versions.

A rack directory (`save_rack`; `save_pretrained` writes the first three groups):

```
config.json, generation_config.json                # transformers' own
model.safetensors.index.json                       # weight map; metadata: stackwise_format, stacks
model-rack[-0000k-of-0000n].safetensors            # embeddings, final norm, LM head
model-stack{i:03d}[-0000k-of-0000n].safetensors    # stack i (a shard never mixes two stacks)
quantization.json                                  # quantized stacks: how, and where their codes are
quantized-stack{i:03d}.safetensors                 # stack i's exact integers and scales
adapters/stackwise_adapters.json                   # adapter manifest: live and merged adapters
adapters/<name>/adapter_config.json                # peft's own layout, one folder per adapter
adapters/<name>/adapter_model.safetensors
```

plus, on the Hub, `README.md` (the model card), `loss.png` and the modeling code (`REMOTE_CODE_FILES`).
A stack directory (`save_stack`) holds one stack's shards and an index of them.

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations

import re

# Every name read from a file (a shard, an adapter, a folder, a codes file) must be one plain path
# component of this form: no separator, no leading dot (so no `..`), nothing absolute.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")

# transformers' files --------------------------------------------------------------------------------

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

# Weights: per-stack shards and their index ------------------------------------------------------------

INDEX_NAME = "model.safetensors.index.json"
# `stackwise_format` in the index metadata: the version of this layout that wrote the directory.
FORMAT_VERSION = 1
# The index metadata key holding {file: sha256} of every other file the writer owns.
DIGESTS_KEY = "sha256"
RACK_GROUP = "rack"  # the shard group of the embeddings, final norm and head


def shard_label(group: int | str) -> str:
    """The label of a shard group in file names: "rack" or "stack007"."""
    return RACK_GROUP if group == RACK_GROUP else f"stack{group:03d}"


def shard_pattern(group: int | str) -> str:
    """The `filename_pattern` huggingface_hub's sharding takes for a group ("{suffix}" is filled in)."""
    return f"model-{shard_label(group)}{{suffix}}.safetensors"


# Any shard file the writer produces (and may remove when a new save no longer names it).
SHARD_FILE = re.compile(r"^model(?:-(?:rack|stack\d{3}))?(?:-\d{5}-of-\d{5})?\.safetensors$")
# Root files a rack replaces wholesale on the Hub: a stale one would be read instead of (or beside) the
# index (transformers prefers a single `model.safetensors` over an index).
WEIGHT_FILE = re.compile(r"^(?:model(?:-[^/]+)?\.safetensors|pytorch_model(?:-[^/]+)?\.bin(?:\.index\.json)?)$")

# Parameter names --------------------------------------------------------------------------------------

# `[model.]stacks.{i}.{rest}`: which stack a rack state-dict key belongs to.
STACK_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)stacks\.(?P<stack>\d+)\.(?P<rest>.+)$")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

# Adapters -----------------------------------------------------------------------------------------------

TRUNK = "trunk"  # the adapter spanning several (frozen) stacks
STACK_ADAPTER = re.compile(r"^stack_(\d+)$")


def stack_adapter_name(stack_idx: int) -> str:
    return f"stack_{stack_idx}"


ADAPTERS_DIR = "adapters"
ADAPTER_MANIFEST_NAME = "stackwise_adapters.json"
ADAPTER_MANIFEST = f"{ADAPTERS_DIR}/{ADAPTER_MANIFEST_NAME}"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_ENTRY_KEYS = ("name", "stacks", "merged", "folder")
# peft's file names and the key prefix `PeftModel.save_pretrained` gives every tensor (the PeftModel
# wraps the rack as `base_model.model`); written the same way so plain peft loads our files.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."

# Quantized stacks ----------------------------------------------------------------------------------------

QUANTIZATION_MANIFEST = "quantization.json"
QUANTIZATION_FORMAT_VERSION = 1


def codes_file(stack_idx: int) -> str:
    """The file holding stack `stack_idx`'s quantized integers and scales."""
    return f"quantized-stack{stack_idx:03d}.safetensors"


CODES_FILE = re.compile(r"^quantized-stack\d{3}\.safetensors$")


# What the writer owns ---------------------------------------------------------------------------------------

# Marks in the names of the sibling directories an atomic save writes into and moves aside (`atomic.py`).
NEW_DIR_MARK = ".stackwise-new-"
OLD_DIR_MARK = ".stackwise-old-"


def is_adapter_file(rel: str) -> bool:
    """True for a file of the adapter format, by its POSIX path relative to `adapters/`."""
    parts = rel.split("/")
    return rel == ADAPTER_MANIFEST_NAME or (len(parts) == 2 and parts[1] in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE))


def is_stack_dir_file(rel: str) -> bool:
    """True for a file a stack directory's writer owns (shards and their index)."""
    return rel == INDEX_NAME or bool(SHARD_FILE.match(rel)) or rel.endswith(".tmp")


def is_rack_file(rel: str) -> bool:
    """True for a file the rack writer owns, by its POSIX path relative to the rack directory: a save
    replaces all of them, and keeps every other file (a tokenizer, a card, a user's notes)."""
    if rel.startswith(f"{ADAPTERS_DIR}/"):
        return is_adapter_file(rel[len(ADAPTERS_DIR) + 1:])
    return (rel in (CONFIG_NAME, GENERATION_CONFIG_NAME, QUANTIZATION_MANIFEST) or rel in REMOTE_CODE_FILES
            or is_stack_dir_file(rel) or bool(CODES_FILE.match(rel)) or bool(WEIGHT_FILE.match(rel)))


# The Hub ------------------------------------------------------------------------------------------------

CARD_NAME = "README.md"
LOSS_PLOT_NAME = "loss.png"

# What a rack saved for sharing ships for `trust_remote_code=True` (by default; `remote_code=False` turns
# it off): exactly these modules of the package, copied beside config.json. They import only torch, transformers,
# huggingface_hub and safetensors outside `try` blocks, and every relative import among them names
# one of them (tests/test_remote_code.py checks both, the way transformers reads them: it follows
# `from .x import y` lines, not `from . import x`). Modules that need more (adapters: peft;
# quantization: torchao/bitsandbytes; training: accelerate) are not shipped; the shipped modules import
# them as `from . import x` inside `try` and run without them.
REMOTE_CODE_FILES = (
    "configuration_stackwise.py",
    "modeling_stackwise.py",
    "rack.py",
    "rack_compat.py",
    "growth.py",
    "rack_files.py",
    "serialization.py",
    "stacks.py",
    "checksums.py",
    "atomic.py",
    "resolver.py",
    "hub.py",
    "model_card.py",
    "errors.py",
    "layout.py",
)

# --- checkpoints (training/checkpoint_format.py reads and writes them) ---
# <run>/checkpoint-00000012/{manifest.json, trainer_state.json, run_state.json, rack/, rng/, data/, custom/,
# activation_cache/}; written under a `.tmp` name and renamed into place.
CHECKPOINT_FORMAT = "stackwise-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RUN_STATE = "run_state.json"
CHECKPOINT_RACK_DIR = "rack"
CHECKPOINT_RNG_DIR = "rng"
CHECKPOINT_DATA_DIR = "data"  # per process: the streamed corpus position (`streaming.TrainStream.state_dict()`)
CHECKPOINT_CUSTOM_DIR = "custom"
CHECKPOINT_ACTIVATION_CACHE_DIR = "activation_cache"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_TMP_SUFFIX = ".tmp"
CHECKPOINT_DIR_NAME = re.compile(r"^checkpoint-\d{8,}(?:-\d+)?$")

# The `auto_map` a rack saved with its code carries in config.json: the config, the base model, and the
# rack's own task class (keyed by the class name in `architectures`), all in the shipped modules.
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_stackwise.StackWiseConfig",
    "AutoModel": "modeling_stackwise.StackWiseModel",
}
REMOTE_CODE_TASK_CLASSES = {
    "StackWiseForCausalLM": "AutoModelForCausalLM",
    "StackWiseForMaskedLM": "AutoModelForMaskedLM",
}


def remote_code_auto_map(architecture: str) -> dict[str, str]:
    """`auto_map` for a rack of class `architecture` whose modeling code ships beside its config."""
    task = REMOTE_CODE_TASK_CLASSES.get(architecture)
    return {**REMOTE_CODE_AUTO_MAP, **({task: f"modeling_stackwise.{architecture}"} if task else {})}
