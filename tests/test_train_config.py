"""The training YAML: typos and wrong types are errors that name the key and what is allowed."""

from __future__ import annotations

import pytest
from train_helpers import causal_config, write_config

from deltatune.task.config import apply_overrides
from deltatune.train import ConfigError, load_train_config, validate_config
from deltatune.train.setup import build_adapter_config


def base(tmp_path) -> dict:
    return causal_config(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out")


def test_valid_config_round_trips(tmp_path):
    cfg = validate_config(base(tmp_path))
    assert cfg.training.max_steps == 12
    assert validate_config(cfg.to_dict()) == cfg


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    raw = base(tmp_path)
    raw["training"]["max_stepz"] = 5
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "unknown key 'training.max_stepz'" in message
    assert "max_steps" in message and "grad_accum" in message


def test_unknown_top_level_section(tmp_path):
    raw = base(tmp_path) | {"trainer": {}}
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'; allowed here: .*training"):
        validate_config(raw)


def test_wrong_type_and_bad_choice_name_the_key(tmp_path):
    raw = base(tmp_path)
    raw["training"]["batch_size"] = "eight"
    raw["training"]["precision"] = "fp8"
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    message = str(info.value)
    assert "training.batch_size" in message and "'eight'" in message
    assert "training.precision" in message and "'bf16'" in message


def test_missing_required_key(tmp_path):
    raw = base(tmp_path)
    del raw["training"]["max_steps"]
    with pytest.raises(ConfigError, match="missing required key 'training.max_steps'"):
        validate_config(raw)


def test_cross_field_checks(tmp_path):
    raw = base(tmp_path)
    raw["data"]["format"] = "classification"
    with pytest.raises(ConfigError, match="needs model.task='classification'"):
        validate_config(raw)
    raw = base(tmp_path)
    raw["eval"]["metric"] = "accuracy"
    with pytest.raises(ConfigError, match=r"eval.metric='accuracy' is not computed"):
        validate_config(raw)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path / "c.yaml", base(tmp_path))
    cfg = load_train_config(path, ["training.max_steps=3", "optim.lr=1e-2", "eval.every=null", "adapter.r=2"])
    assert (cfg.training.max_steps, cfg.optim.lr, cfg.eval.every) == (3, 0.01, None)
    assert cfg.adapter.model_extra["r"] == 2
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["training.max_steps"])
    with pytest.raises(ConfigError, match="'max_steps' is a value, not a section"):
        apply_overrides({"training": {"max_steps": 1}}, ["training.max_steps.x=1"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(tmp_path / "bad.yaml")


def test_adapter_section_is_validated_by_the_method(tmp_path, tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    raw = base(tmp_path)
    raw["adapter"]["rank"] = 4
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank'\] in adapter .*allowed: .*lora_alpha"):
        build_adapter_config(validate_config(raw).adapter, "causal_lm", model)
    raw = base(tmp_path)
    raw["adapter"]["method"] = "lorax"
    with pytest.raises(
        ConfigError,
        match="adapter.method=.lorax. is not a known method; choose one of: full, bottleneck, ia3, lora, prefix_tuning, prompt_tuning",
    ):
        build_adapter_config(validate_config(raw).adapter, "causal_lm", model)
    raw = base(tmp_path)
    raw["adapter"]["r"] = 0
    with pytest.raises(ConfigError, match="adapter section"):
        build_adapter_config(validate_config(raw).adapter, "causal_lm", model)


def test_precision_auto_is_bf16_on_a_gpu_that_supports_it_and_fp32_elsewhere(monkeypatch):
    import torch

    from deltatune.task.config import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    assert resolve_precision("fp16", cuda) == "fp16" and resolve_precision("fp32", cuda) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert resolve_precision("auto", cuda) == "fp32"
