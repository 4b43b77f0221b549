"""Every file of a saved rack is verified, every path read from a file stays in its folder, and every
format refuses versions it does not know: a damaged or hostile rack raises an error naming the file, and
the rack being loaded into is left as it was."""

import json
import logging
import os
import shutil

import pytest
import torch

from stackwise_hf import CorruptFileError, StackWiseForCausalLM
from stackwise_hf.adapters import add_stack_adapter, add_trunk_adapter
from stackwise_hf.cli import main as cli
from stackwise_hf.errors import UnsafePathError, UnsupportedFormatError
from stackwise_hf.layout import ADAPTER_MANIFEST, INDEX_NAME
from stackwise_hf.rack_files import verify_rack
from tiny import tiny_config, tiny_rack

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "racks_v1")
SHAPE = dict(stack_sizes=[1, 2])


@pytest.fixture
def saved(tmp_path):
    rack = tiny_rack(**SHAPE)
    add_stack_adapter(rack, 1, r=2, lora_alpha=4, init_lora_weights=False)
    add_trunk_adapter(rack, [0], r=2, lora_alpha=4, target="attention", init_lora_weights=False)
    rack.save_rack(tmp_path / "rack")
    return tmp_path / "rack"


def _fresh():
    return StackWiseForCausalLM(tiny_config(**SHAPE)).eval()


def _flip(path, offset=-9):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _unchanged(rack, before):
    return all(torch.equal(v, before[k]) for k, v in rack.state_dict().items())


# Verification ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model-stack001.safetensors", "model-rack.safetensors", "config.json",
                                  "adapters/stack_1/adapter_model.safetensors", "adapters/trunk/adapter_config.json"])
def test_a_flipped_byte_anywhere_is_a_corrupt_file_error_naming_the_file(saved, name):
    _flip(saved / name, offset=-2 if name.endswith(".json") else -9)
    rack = _fresh()
    before = {k: v.clone() for k, v in rack.state_dict().items()}
    with pytest.raises(CorruptFileError, match=rf"{os.path.basename(name)}"):
        rack.load_rack(saved)
    if not name.startswith("adapters/"):  # adapters are checked after the weights are in
        assert _unchanged(rack, before)
    assert cli(["verify", str(saved)]) == 1


def test_load_stack_and_from_pretrained_verify(saved):
    _flip(saved / "model-stack001.safetensors")
    with pytest.raises(CorruptFileError, match="model-stack001.safetensors: sha256"):
        _fresh().load_stack(1, saved)
    _fresh().load_stack(0, saved)  # stack 0's files are intact, and only they are read
    with pytest.raises(CorruptFileError, match="model-stack001.safetensors: sha256"):
        StackWiseForCausalLM.from_pretrained(saved, verify=True)
    StackWiseForCausalLM.from_pretrained(saved)  # on request only: a flip inside tensor data loads


def test_a_deleted_adapter_manifest_is_an_error_not_no_adapters(saved):
    os.remove(saved / ADAPTER_MANIFEST)
    with pytest.raises(CorruptFileError, match=r"stackwise_adapters.json is missing"):
        _fresh().load_rack(saved)


def test_verify_cli_and_a_clean_rack(saved, capsys):
    assert cli(["verify", str(saved)]) == 0
    assert "OK" in capsys.readouterr().out
    report = verify_rack(saved)
    assert report["unverified"] is False and report["verified"] == report["files"] > 5


def test_a_rack_saved_before_digests_loads_with_a_warning(tmp_path, caplog, capsys):
    path = shutil.copytree(os.path.join(FIXTURES, "pretrained"), tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="stackwise_hf"):
        StackWiseForCausalLM(tiny_config(**{**SHAPE, "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                            "num_attention_heads": 2, "num_key_value_heads": 1})).load_rack(path)
    assert "without sha256 digests" in caplog.text
    assert cli(["verify", str(path)]) == 0
    assert "UNVERIFIED" in capsys.readouterr().out


# Paths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["../foreign/model-stack001.safetensors", "/etc/passwd", "sub/model.safetensors"])
def test_weight_map_entries_must_be_files_in_the_folder(saved, entry):
    _edit_json(saved / INDEX_NAME, lambda d: d["weight_map"].update({next(iter(d["weight_map"])): entry}))
    with pytest.raises(UnsafePathError, match="weight_map"):
        _fresh().load_rack(saved)


@pytest.mark.parametrize("field,value,match", [("folder", "../../other/adapters/stack_1", "folder"),
                                               ("name", "a/b", "not a plain name"),
                                               ("stacks", ["1"], "list of integers")])
def test_adapter_manifest_names_stay_in_the_folder(saved, field, value, match):
    _edit_json(saved / ADAPTER_MANIFEST, lambda d: d["adapters"][0].update({field: value}))
    with pytest.raises(CorruptFileError, match=match):
        _fresh().load_rack(saved, verify=False)


def test_a_symlink_leading_out_is_refused(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / "model-stack000.safetensors", outside)
    os.symlink(outside, saved / "model-stack000.safetensors")
    with pytest.raises(UnsafePathError, match="outside"):
        _fresh().load_rack(saved)


def test_stack_indices_must_be_integers(saved):
    _edit_json(saved / INDEX_NAME, lambda d: d["metadata"]["stacks"].update({"../1": d["metadata"]["stacks"]["1"]}))
    with pytest.raises(CorruptFileError, match=r"'\.\./1' is not a stack index"):
        _fresh().load_stack(0, saved)


# Versions and fields ---------------------------------------------------------------------------------


def test_unknown_versions_are_refused_naming_found_and_supported(saved):
    _edit_json(saved / INDEX_NAME, lambda d: d["metadata"].update(stackwise_format=99))
    with pytest.raises(UnsupportedFormatError, match=r"stackwise_format 99 is not supported .*reads 1"):
        _fresh().load_rack(saved)


def test_an_unknown_model_type_is_refused(saved):
    _edit_json(saved / "config.json", lambda d: d.update(model_type="stackwise_v2"))
    with pytest.raises(UnsupportedFormatError, match=r"model_type 'stackwise_v2'; this library reads 'stackwise'"):
        _fresh().load_rack(saved, verify=False)


def test_an_unknown_adapter_manifest_version_is_refused(saved):
    _edit_json(saved / ADAPTER_MANIFEST, lambda d: d.update(format_version=2))
    with pytest.raises(UnsupportedFormatError, match="format_version 2 is not supported"):
        _fresh().load_rack(saved, verify=False)


@pytest.mark.parametrize("change,match", [(lambda d: d.pop("lora_alpha"), "`lora_alpha` is missing"),
                                          (lambda d: d.update(r="4"), "`r` must be"),
                                          (lambda d: d.update(peft_type="IA3"), "only 'LORA'")])
def test_adapter_config_fields_are_type_checked(saved, change, match):
    # As from a writer that records no digests (the digest check alone would already refuse the edit).
    _edit_json(saved / ADAPTER_MANIFEST, lambda d: [e.pop("sha256", None) for e in d["adapters"]])
    _edit_json(saved / "adapters/stack_1/adapter_config.json", change)
    with pytest.raises(CorruptFileError, match=rf"adapter_config.json: .*{match}"):
        _fresh().load_rack(saved, verify=False)
