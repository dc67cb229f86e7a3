from pathlib import Path

import pytest
import yaml

from cogcore.configs import CONFIG_DIR
from cogcore.train.checkpoint import flat_config
from cogcore.train.config import ConfigError, load_config, to_dict
from cogcore.train.distributed import strategy_from_accelerate_file
from cogcore.train.sft import SFTConfig

RECIPE_CONFIGS = {"sft": SFTConfig}


def _config_class(path: Path):
    kind = path.relative_to(CONFIG_DIR).parts[0]
    if kind == "distill":
        from cogcore.distill.recipe import DistillConfig
        return DistillConfig
    if kind == "sleep":
        from cogcore.lora.sleep import SleepConfig
        return SleepConfig
    if kind == "experiment":
        from cogcore.distill.cognitive_core import ExperimentConfig
        return ExperimentConfig
    return RECIPE_CONFIGS[kind]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_every_shipped_yaml_loads(path):
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ") and ("cogcore" in header or "accelerate" in header), \
        f"{path.name}: first line must be the launch command"
    if path.parent.name == "accelerate":
        assert strategy_from_accelerate_file(path) == path.stem
    else:
        cfg = load_config(_config_class(path), path)
        data, loaded = flat_config(yaml.safe_load(path.read_text())), flat_config(to_dict(cfg))
        assert data, f"{path.name} sets no key"
        for key, value in data.items():  # every key in the file, nested ones too, reached the config
            assert key in loaded, key
            assert loaded[key] == value, (key, loaded[key], value)


def test_the_yaml_check_sees_nested_keys(tmp_path):
    """A nested value that the config changed on the way in is caught (the old check read only top-level keys)."""
    from cogcore.distill.recipe import DistillConfig
    f = tmp_path / "onpolicy.yaml"
    f.write_text("teacher_mode: on-policy\ndata:\n  packing: true\n")  # on-policy turns packing off
    data, loaded = flat_config(yaml.safe_load(f.read_text())), flat_config(to_dict(load_config(DistillConfig, f)))
    assert [k for k in data if loaded[k] != data[k]] == ["data.packing"]


def test_overrides_are_typed_and_nested():
    cfg = load_config(SFTConfig, None, ["train.lr=1e-3", "train.max_steps=7", "data.packing=false",
                                        "lora.target_modules=[q_proj,v_proj]", "model.source=tiny-llama"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7 and cfg.data.packing is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    # a list key given one value is a list of one; a comma list is a list
    from cogcore.lora.refresh import RefreshConfig
    assert load_config(RefreshConfig, None, ["lora.layers=-1"]).lora.layers == [-1]
    assert load_config(RefreshConfig, None, ["lora.layers=12,-1"]).lora.layers == [12, -1]
    assert load_config(SFTConfig, None, ["lora.target_modules=q_proj"]).lora.target_modules == ["q_proj"]
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(RefreshConfig, None, ["lora.layers=[1,top]"])


def test_unknown_key_names_the_key_and_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*Did you mean 'train.lr'"):
        load_config(SFTConfig, None, ["train.lrr=1"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"train.precision: got 'fp8', allowed values are 'auto', 'fp32', 'bf16'"):
        load_config(SFTConfig, None, ["train.precision=fp8"])


def test_bad_type_and_cross_field_validation():
    with pytest.raises(ConfigError, match="train.max_steps: got 'many', expected an integer"):
        load_config(SFTConfig, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="data.eval_documents=50 leaves nothing to train on"):
        load_config(SFTConfig, None, ["data.max_documents=10", "data.eval_documents=50"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)


@pytest.mark.parametrize("override", ["train.lr=nan", "train.lr=.nan", "train.lr=inf", "train.lr=-.inf",
                                      "train.min_lr_ratio=nan", "train.grad_clip=nan", "train.weight_decay=inf"])
def test_non_finite_numbers_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: got .*, expected a finite number"):
        load_config(SFTConfig, None, [override])


def test_non_finite_number_in_a_yaml_file(tmp_path):
    f = tmp_path / "nan.yaml"
    f.write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match="train.lr: got nan, expected a finite number"):
        load_config(SFTConfig, f)


def test_one_nested_key_keeps_the_rest_of_the_sections_own_default():
    """ExperimentConfig.train has its own defaults (lr, progress: not TrainConfig's): setting
    train.max_steps alone must not reset them to the class defaults."""
    from cogcore.distill.cognitive_core import ExperimentConfig
    from cogcore.train.loop import TrainConfig
    default, plain = ExperimentConfig().train, TrainConfig()
    assert default.lr != plain.lr and default.progress != plain.progress  # else this test checks nothing
    cfg = load_config(ExperimentConfig, None, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == default.lr and cfg.train.micro_batch == default.micro_batch
    assert cfg.train.progress is default.progress and cfg.loss.kind == "forward_kl"
    cfg = load_config(ExperimentConfig, None, ["loss.temperature=2"])
    assert cfg.loss.kind == "forward_kl" and cfg.loss.temperature == 2.0  # not LossConfig's default jsd
