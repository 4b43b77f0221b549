"""What a rack ships for `trust_remote_code=True` is `layout.REMOTE_CODE_FILES`, and that list agrees with
how transformers reads the files: the relative imports it follows from the modeling and configuration
files reach exactly the listed modules, and outside `try` blocks they import only libraries a bare
transformers install has. (tests/test_hub.py loads a pushed rack that way, without stackwise_hf.)"""

import os

from transformers.dynamic_module_utils import get_imports, get_relative_imports

import stackwise_hf
from stackwise_hf.layout import REMOTE_CODE_FILES
from stackwise_hf.rack_files import ship_remote_code
from tiny import tiny_rack

PACKAGE = os.path.dirname(stackwise_hf.__file__)
# transformers itself depends on huggingface_hub, safetensors and pyyaml.
ALLOWED_LIBRARIES = {"torch", "transformers", "huggingface_hub", "safetensors", "yaml", "__future__"}


def _reached(start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [f"{module}.py" for module in get_relative_imports(os.path.join(PACKAGE, name))]
    return seen


def test_the_shipped_list_is_what_transformers_follows_from_the_modeling_files():
    assert _reached(["modeling_stackwise.py", "configuration_stackwise.py"]) == set(REMOTE_CODE_FILES)


def test_shipped_modules_import_only_what_a_bare_transformers_install_has():
    import sys

    for name in REMOTE_CODE_FILES:
        outside = {m for m in get_imports(os.path.join(PACKAGE, name)) if m not in sys.stdlib_module_names}
        assert outside <= ALLOWED_LIBRARIES, (name, sorted(outside - ALLOWED_LIBRARIES))


def test_saving_a_registered_rack_copies_exactly_the_list(tmp_path, monkeypatch):
    from stackwise_hf import StackWiseForCausalLM

    rack = tiny_rack()
    monkeypatch.setattr(StackWiseForCausalLM, "_auto_class", "AutoModelForCausalLM")
    rack.save_pretrained(tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".py")) == sorted(REMOTE_CODE_FILES)
    assert rack.config.auto_map["AutoModelForCausalLM"] == "modeling_stackwise.StackWiseForCausalLM"
    assert ship_remote_code(rack, tmp_path) == list(REMOTE_CODE_FILES)
