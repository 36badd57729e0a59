"""deltatune.json as a typed record (core/record.py): the same JSON written and read back byte for byte,
keys of a newer writer kept, and a damaged field refused by name when the folder is read."""

from __future__ import annotations

import json

import pytest
from conftest import build_llama

import deltatune as dt
from deltatune.core.errors import AdapterFormatError
from deltatune.core.io import read_provenance
from deltatune.core.record import Provenance


@pytest.fixture()
def saved(tmp_path):
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    return dt.save_adapter(model, tmp_path / "a", metrics={"loss": 0.5}, training_config={"data": {"x": 1}})


def test_the_record_reads_back_to_the_json_it_was_written_as(saved):
    text = (saved / "deltatune.json").read_text()
    record = read_provenance(saved)
    assert record.to_json() + "\n" == text  # the typed record is the file, byte for byte
    assert record.to_json() == json.dumps(json.loads(text), indent=2, sort_keys=True)
    assert record.base_model.architecture == "LlamaForCausalLM" and set(record.base_model.targets) >= {
        "model.layers.0.self_attn.q_proj"
    }
    assert record.metrics == {"loss": 0.5} and record.trained_data() == {"x": 1}
    assert record.file_sha256("adapter_model.safetensors") == record.files["adapter_model.safetensors"].sha256


def test_a_newer_writers_keys_are_kept(saved):
    raw = json.loads((saved / "deltatune.json").read_text())
    raw["from_the_future"] = {"nested": [1, 2]}
    raw["base_model"]["extra_hash"] = "abc"
    record = Provenance.parse(raw, "x")
    assert json.loads(record.to_json()) == raw


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("base_model", "a string", "base_model"),
        ("parameters", {"model_total": "many"}, "parameters.model_total"),
        ("labels", {"id2label": ["a", "b"]}, "labels.id2label"),
        ("files", {"adapter_model.safetensors": {"sha256": 5}}, "files.adapter_model.safetensors.sha256"),
    ],
)
def test_a_damaged_field_is_refused_by_name(saved, field, value, where):
    raw = json.loads((saved / "deltatune.json").read_text())
    raw[field] = value
    (saved / "deltatune.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFormatError, match=rf"deltatune.json: {where}: .*remove deltatune.json"):
        dt.load_adapter(build_llama(), saved)
