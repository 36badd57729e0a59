"""Hot-swap: overwriting a loaded LoRA adapter in place with another of the same layout equals loading that
adapter fresh, keeps every tensor, and refuses (leaving the slot unchanged) anything it cannot take; the
adapter cache reuses unloaded adapters' tensors this way, within its budget."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_llama

import deltatune as dt
from deltatune.core.hotswap import AdapterSlot, LayoutMismatch, overwrite_adapter, saved_layout
from deltatune.core.state import adapter_state_dict
from deltatune.runtime import AdapterCache

IDS = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(5))


class _Vocab:
    """A stand-in tokenizer: provenance hashes its vocabulary."""

    def __init__(self, size: int) -> None:
        self.vocab = {f"t{i}": i for i in range(size)}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def _save(folder, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), base=None, tokenizer=None, **extra):
    model = base if base is not None else build_llama()
    torch.manual_seed(seed)
    config = dt.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra
    )
    dt.inject(model, config, adapter_name="x")
    return dt.save_adapter(model, folder, adapter_name="x", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Same layout: s1, s2 (another alpha, hence another scale), s3; other layouts: rank 8, other targets."""
    root = tmp_path_factory.mktemp("swap")
    folders = {
        "s1": _save(root / "s1", 1),
        "s2": _save(root / "s2", 2, alpha=3),
        "s3": _save(root / "s3", 6),
        "rank8": _save(root / "rank8", 3, r=8),
        "targets": _save(root / "targets", 4, targets=("q_proj", "o_proj")),
        "tok96": _save(root / "tok96", 8, tokenizer=_Vocab(96)),
        "tok97": _save(root / "tok97", 9, tokenizer=_Vocab(97)),
    }
    other_base = build_llama()
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    folders["other_base"] = _save(root / "other_base", 5, base=other_base)
    return folders


def _logits(model, name="x"):
    dt.set_adapter(model, name)
    with torch.no_grad():
        return model(IDS).logits


def _loaded(folder):
    model = build_llama()
    dt.load_adapter(model, folder, adapter_name="x")
    return model


def _tensors(model):
    return {k: (t.data_ptr(), t.clone()) for k, t in adapter_state_dict(model, "x").items()}


def test_overwrite_equals_a_fresh_load_and_keeps_every_tensor(saved):
    model = _loaded(saved["s1"])
    before = _tensors(model)
    overwrite_adapter(model, "x", saved["s2"])
    torch.testing.assert_close(_logits(model), _logits(_loaded(saved["s2"])), atol=0, rtol=0)
    after = _tensors(model)
    assert {k: p for k, (p, _) in after.items()} == {k: p for k, (p, _) in before.items()}  # same storage
    assert all(not torch.equal(after[k][1], before[k][1]) for k in after)  # every tensor was rewritten
    assert dt.adapter_configs(model)["x"].lora_alpha == 3  # the config, hence the scale, came along
    assert model.model.layers[0].self_attn.q_proj.scaling["x"] == 3 / 4


@pytest.mark.parametrize(
    "source, error, match",
    [
        ("rank8", LayoutMismatch, "tensors differ"),
        ("targets", LayoutMismatch, "o_proj"),
        ("other_base", dt.BaseModelMismatchError, "targeted base weights differ"),
        ("flipped", dt.AdapterFormatError, "sha256 mismatch"),
    ],
)
def test_refused_overwrite_leaves_the_slot_unchanged(saved, tmp_path, source, error, match):
    model = _loaded(saved["s1"])
    expected = _logits(model)
    folder = saved.get(source)
    if source == "flipped":  # s2 with one weight byte changed: parses, but its recorded hash disagrees
        folder = tmp_path / "flipped"
        folder.mkdir()
        for item in saved["s2"].iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
        data = bytearray((folder / "adapter_model.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (folder / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(error, match=match):
        overwrite_adapter(model, "x", folder)
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
    assert dt.adapter_configs(model)["x"].lora_alpha == 8


def test_only_plain_lora_is_hot_swapped(saved, tmp_path):
    model = build_llama()
    dt.inject(model, dt.Ia3Config(target_modules=["k_proj"], feedforward_modules=[]), adapter_name="ia3")
    with pytest.raises(LayoutMismatch, match="IA3"):
        AdapterSlot(model, "ia3")
    ia3 = dt.save_adapter(model, tmp_path / "ia3", adapter_name="ia3")
    assert saved_layout(ia3) is None and saved_layout(tmp_path / "missing") is None
    assert saved_layout(saved["s1"]) == AdapterSlot(_loaded(saved["s1"]), "x").layout


def test_cache_reuses_an_unloaded_adapters_tensors(saved):
    model = build_llama()
    cache = AdapterCache(model, saved["s1"].parent)
    first = cache.load("s1")
    size = first.bytes
    ptrs = {k: p for k, (p, _) in _tensors_of(model, first.key).items()}
    cache.unload("s1")
    assert cache.loaded == [] and cache.bytes_used == size == cache.free_slot_bytes  # kept as a free slot
    second = cache.load("s2")
    assert second.key == first.key and len(dt.adapter_configs(model)) == 1
    assert {k: p for k, (p, _) in _tensors_of(model, second.key).items()} == ptrs
    torch.testing.assert_close(_logits(model, second.key), _logits(_loaded(saved["s2"])), atol=0, rtol=0)
    cache.unload("s2")
    third = cache.load("rank8")  # another layout: a fresh adapter next to the free slot
    assert third.key != first.key and cache.bytes_used == size + third.bytes
    assert cache.release_free_slots() == size
    assert list(dt.adapter_configs(model)) == [third.key]


def test_cache_evicts_into_a_free_slot_within_its_budget(saved):
    size = AdapterCache(build_llama(), saved["s1"].parent).load("s1").bytes
    model = build_llama()
    cache = AdapterCache(model, saved["s1"].parent, budget_bytes=2 * size)
    s1_key = cache.load("s1").key
    cache.load("s2")
    s3 = cache.load("s3")  # a third of the same layout: s1, least recently used, is evicted into its slot
    assert s3.key == s1_key and [e.name for e in cache.loaded] == ["s2", "s3"]
    assert cache.bytes_used == 2 * size and len(dt.adapter_configs(model)) == 2
    torch.testing.assert_close(_logits(model, s3.key), _logits(_loaded(saved["s3"])), atol=0, rtol=0)
    big = cache.load("rank8")  # twice the size, another layout: both are evicted and their slots deleted
    assert big.bytes == 2 * size and [e.name for e in cache.loaded] == ["rank8"]
    assert cache.bytes_used == 2 * size and list(dt.adapter_configs(model)) == [big.key]


def _tensors_of(model, key):
    return {k: (t.data_ptr(), None) for k, t in adapter_state_dict(model, key).items()}


def test_saved_layout_reads_only_config_and_header(saved, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for item in saved["s1"].iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert saved_layout(folder) is None  # modules_to_save: a full module copy is not a slot


def test_cache_loads_and_swaps_check_the_tokenizer_hashing_it_once(saved, monkeypatch):
    from deltatune.core import provenance
    from deltatune.runtime import cache as cache_module

    hashed = []
    real = provenance.tokenizer_hash
    counted = lambda t: hashed.append(t) or real(t)  # noqa: E731
    monkeypatch.setattr(cache_module, "tokenizer_hash", counted)
    monkeypatch.setattr(provenance, "tokenizer_hash", counted)  # what load_adapter would call
    cache = AdapterCache(build_llama(), saved["s1"].parent, tokenizer=_Vocab(96))
    key = cache.load("tok96").key
    cache.unload("tok96")
    with pytest.raises(dt.BaseModelMismatchError, match="tokenizer differs"):
        cache.load("tok97")  # same shapes, saved with another vocabulary: refused, the slot stays free
    assert cache.free_slot_bytes > 0 and cache.loaded == []
    assert cache.load("tok96").key == key
    with pytest.raises(dt.BaseModelMismatchError, match="tokenizer differs"):
        cache.load("tok97")  # no free slot now: the fresh path checks the tokenizer too
    assert len(hashed) == 1
