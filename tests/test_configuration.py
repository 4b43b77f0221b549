import json

import pytest
import yaml

from stackwise_hf import StackWiseConfig
from tiny import tiny_config


def test_derived_fields_and_precision_aliases():
    config = tiny_config(stack_sizes=[2, 3, 1], stack_dtypes=["full", "bf16", "half"])
    assert config.num_hidden_layers == 6 and config.num_stacks == 3
    assert config.stack_dtypes == ["float32", "bfloat16", "float16"]
    assert config.head_dim == 8 and list(config.stack_block_range(1)) == [2, 3, 4]


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("stack_sizes", "2,2", "`stack_sizes`"),  # [] is valid: an empty rack
        ("stack_sizes", [2, 0], "`stack_sizes`"),
        ("stack_dtypes", ["float32", "int8"], "int8"),
        ("stack_dtypes", ["float32"], "one dtype per stack"),
        ("num_key_value_heads", 3, "`num_key_value_heads` (3)"),
        ("attention_mode", "sideways", "sideways"),
        ("hidden_size", -4, "`hidden_size`"),
        ("rope_theta", 0, "`rope_theta`"),
        ("rms_norm_eps", 0, "`rms_norm_eps`"),
        ("rope_parameters", {"rope_type": "sideways"}, "sideways"),
        ("rope_parameters", {"rope_type": "linear"}, "factor"),
        ("mask_token_id", 1000, "`mask_token_id`"),
    ],
)
def test_invalid_fields_name_field_and_value(field, value, fragment):
    with pytest.raises(ValueError) as err:
        tiny_config(**{field: value})
    assert fragment in str(err.value)


def test_unknown_field_is_named_with_allowed_list():
    # A hand-written mapping (a YAML `model:` section) is checked for typos; the constructor, like every
    # transformers config, keeps extra attributes (test_extra_attributes_round_trip).
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hiden_size'\].*allowed fields.*hidden_size"):
        StackWiseConfig.from_fields(dict(vocab_size=96, hiden_size=32))


def test_extra_attributes_round_trip(tmp_path):
    config = tiny_config(my_flag=1)
    config.other_library_setting = {"a": [1, 2]}
    config.save_pretrained(tmp_path)
    loaded = StackWiseConfig.from_pretrained(tmp_path)
    assert loaded.my_flag == 1 and loaded.other_library_setting == {"a": [1, 2]}


def test_odd_but_valid_values_are_accepted():
    assert tiny_config(rms_norm_eps=1.0).rms_norm_eps == 1.0
    empty = tiny_config(stack_sizes=[])
    assert empty.num_hidden_layers == 0 and empty.num_stacks == 0 and empty.stack_dtypes == []


def test_num_hidden_layers_alone_is_one_stack():
    assert tiny_config(stack_sizes=None, num_hidden_layers=3).stack_sizes == [3]
    with pytest.raises(ValueError, match="disagrees"):
        tiny_config(stack_sizes=[1, 1], num_hidden_layers=3)
    with pytest.raises(NotImplementedError, match="stack_sizes"):
        tiny_config().num_hidden_layers = 7


def test_rope_parameters_and_legacy_rope_scaling(tmp_path):
    config = tiny_config(rope_theta=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    config.save_pretrained(tmp_path)
    assert StackWiseConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


def test_config_json_round_trip(tmp_path):
    config = tiny_config(stack_sizes=[1, 2], stack_dtypes=["float32", "bfloat16"], tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    loaded = StackWiseConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_bad_config_json_names_file_and_field(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["stack_dtypes"] = ["float32", "float8"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{tmp_path}.*float8"):
        StackWiseConfig.from_pretrained(tmp_path)


def test_yaml_round_trip_and_experiment_sections(tmp_path):
    config = tiny_config(stack_sizes=[2, 2], stack_dtypes=["float32", "half"])
    path = tmp_path / "rack.yaml"
    config.to_yaml(path)
    loaded = StackWiseConfig.from_yaml(path)
    assert loaded.stack_sizes == [2, 2] and loaded.stack_dtypes == ["float32", "float16"]
    assert loaded.hidden_size == 32

    experiment = {"model": {"hidden_size": 64, "num_attention_heads": 4}, "training": {"save_interval": 5}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(experiment))
    loaded = StackWiseConfig.from_yaml(tmp_path / "exp.yaml")
    assert loaded.hidden_size == 64 and loaded.experiment_sections == {"training": {"save_interval": 5}}
    assert "experiment_sections" not in loaded.to_dict()


def test_yaml_with_wrong_field_names_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  hidden_size: 64\n  num_layers: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*num_layers"):
        StackWiseConfig.from_yaml(tmp_path / "bad.yaml")


def test_bundled_model_yaml_files_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        assert StackWiseConfig.from_yaml(path).num_stacks >= 1, path
