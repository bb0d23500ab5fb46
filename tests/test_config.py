import pytest

from asr.config import from_dict, load_config, to_dict
from asr.errors import ConfigError
from asr.model import ModelConfig
from asr.train import TrainConfig


def write_yaml(tmp_path, text: str):
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    assert load_config(TrainConfig) == TrainConfig()
    assert load_config(ModelConfig) == ModelConfig()


def test_yaml_overrides_defaults(tmp_path):
    path = write_yaml(tmp_path, "model:\n  hidden_size: 64\n  rnn_type: gru\noptim:\n  lr: 0.002\nepochs: 3\n")
    config = load_config(TrainConfig, path)
    assert config.model.hidden_size == 64 and config.model.rnn_type == "gru"
    assert config.optim.lr == 0.002 and config.epochs == 3
    # Everything not named keeps its default.
    assert config.model.num_layers == ModelConfig().num_layers
    assert config.optim.warmup_steps == TrainConfig().optim.warmup_steps
    assert config.data == TrainConfig().data


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_config(TrainConfig, write_yaml(tmp_path, "")) == TrainConfig()
    assert load_config(TrainConfig, write_yaml(tmp_path, "# only a comment\n")) == TrainConfig()


def test_dotted_overrides(tmp_path):
    path = write_yaml(tmp_path, "model:\n  hidden_size: 64\nepochs: 3\n")
    config = load_config(TrainConfig, path, [
        "model.hidden_size=32",  # beats the YAML file
        "optim.lr=3e-3",  # YAML 1.1 reads this as a string; it must still be a float
        "optim.weight_decay=0",  # an int where a float is expected
        "specaugment.enabled=false",
        "device=cpu",
        "data.max_batch_seconds=80",
        " seed = 7 ",
    ])
    assert config.model.hidden_size == 32
    assert config.epochs == 3  # from the file, untouched
    assert config.optim.lr == 0.003 and type(config.optim.lr) is float
    assert config.optim.weight_decay == 0.0 and type(config.optim.weight_decay) is float
    assert config.specaugment.enabled is False
    assert config.device == "cpu"
    assert config.data.max_batch_seconds == 80.0
    assert config.seed == 7


def test_later_overrides_win():
    config = load_config(TrainConfig, None, ["epochs=2", "epochs=5"])
    assert config.epochs == 5


@pytest.mark.parametrize("override, key", [
    ("model.hiden_size=64", "model.hiden_size"),
    ("optim.learning_rate=1e-3", "optim.learning_rate"),
    ("epoch=3", "epoch"),
    ("nosuch.section.key=1", "nosuch"),
])
def test_unknown_key_names_the_dotted_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    message = str(err.value)
    assert f"unknown config key {key}" in message


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["model.hiden_size=64"])
    assert "model.hidden_size" in str(err.value) and "model.num_layers" in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "optim:\n  lr: 0.001\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="optim.momentum"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=abc", "model.hidden_size"),
    ("model.hidden_size=2.5", "model.hidden_size"),
    ("model.hidden_size=true", "model.hidden_size"),  # a bool is not an int here
    ("epochs=", "epochs"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("specaugment.enabled=3", "specaugment.enabled"),
    ("device=0", "device"),
    ("model=5", "model"),  # a section set to a scalar
    ("epochs.x=3", "epochs"),  # a scalar used as a section
])
def test_wrong_type_raises(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert key in str(err.value)


def test_list_values_from_yaml_and_overrides(tmp_path):
    config = load_config(TrainConfig, write_yaml(tmp_path, "data:\n  speeds: [0.9, 1, 1.1]\n"))
    assert config.data.speeds == (0.9, 1.0, 1.1)
    assert all(type(s) is float for s in config.data.speeds)
    assert load_config(TrainConfig, None, ["data.speeds=[1.0]"]).data.speeds == (1.0,)
    with pytest.raises(ConfigError, match=r"data.speeds\[1\]"):
        load_config(TrainConfig, None, ["data.speeds=[1.0, fast]"])
    with pytest.raises(ConfigError, match="data.speeds"):
        load_config(TrainConfig, None, ["data.speeds=1.1"])
    with pytest.raises(ConfigError, match="positive"):
        load_config(TrainConfig, None, ["data.speeds=[0.0, 1.0]"])


def test_cached_features_refuse_augmentations_that_change_them():
    assert load_config(TrainConfig, None, ["data.cache_features=true"]).data.cache_features
    for clash in ("vtlp=0.1", "data.speeds=[0.9,1.0,1.1]"):
        with pytest.raises(ConfigError, match="cache_features"):
            load_config(TrainConfig, None, ["data.cache_features=true", clash])


def test_vtlp_must_leave_a_spectrum():
    assert load_config(TrainConfig, None, ["vtlp=0.1"]).vtlp == 0.1
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="vtlp"):
            load_config(TrainConfig, None, [f"vtlp={bad}"])


def test_wrong_type_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "model:\n  num_layers: three\n")
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("override", ["model.hidden_size", "=3", "", "hidden_size 64"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, None, [override])


def test_override_into_a_yaml_scalar(tmp_path):
    path = write_yaml(tmp_path, "model: 5\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(TrainConfig, path, ["model.hidden_size=3"])


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "model: [1, 2\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="conf.yaml"):
        load_config(TrainConfig, path)


def test_missing_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_dict_round_trip():
    config = load_config(TrainConfig, None, ["model.hidden_size=48", "optim.lr=5e-4", "data.num_workers=0"])
    values = to_dict(config)
    assert values["model"]["hidden_size"] == 48 and values["optim"]["lr"] == 5e-4
    assert from_dict(TrainConfig, values) == config
