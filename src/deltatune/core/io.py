"""Save and load adapters: PEFT's two files plus deltatune.json, written atomically and read back to check.

Layout of an adapter folder:
  adapter_config.json        PEFT's config, field names unchanged
  adapter_model.safetensors  PEFT's keys (state.py)
  deltatune.json             provenance: schema version, base fingerprint, hashes, environment, metrics
Folders written by PEFT (no deltatune.json) load too; their base model cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import patterns, provenance
from .adapters import (
    active_adapters,
    adapter_configs,
    adapter_layers,
    delete_adapter,
    merged_adapter_names,
    set_adapter,
)
from .atomic import staged_folder
from .config import CONFIG_NAME, AdapterConfig, load_config_file, read_json_object
from .errors import (
    AdapterFormatError,
    AdapterNameError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    DeltatuneWarning,
    UnsafeFormatError,
)
from .hashing import sha256_file
from .inject import inject
from .layer import weights_follow
from .param_targets import unwrapped_name
from .quantized import model_quantization
from .record import Provenance
from .registry import get_method
from .state import adapter_state_dict, load_adapter_state_dict

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PROVENANCE_NAME = "deltatune.json"


def _targets_of(model: nn.Module, adapter_name: str) -> list[str]:
    return [name for name, layer in adapter_layers(model) if adapter_name in layer.adapter_configs]


def _check_destination(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise AdapterFormatError(
            f"{path} exists and is a file; an adapter is saved as a folder. Pick another path."
        )


def save_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    *,
    tokenizer: Any = None,
    training_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data_sha256: str | None = None,
    derived_from: dict[str, Any] | None = None,
) -> Path:
    """Write one adapter to the folder `path` (created if needed) and verify what was written.
    `derived_from`: for an adapter made from others (combine, convert), its sources and how."""
    path = Path(path)
    _check_destination(path)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNameError(f"no adapter named {adapter_name!r} to save; this model has {sorted(configs)}")
    config = configs[adapter_name]
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter_name).items()
    }
    if not tensors:
        raise AdapterFormatError(
            f"adapter {adapter_name!r} has no tensors; refusing to write an empty adapter"
        )
    with staged_folder(path) as staging:
        config_dict = config.to_dict()
        if config_dict.get("base_model_name_or_path") is None:
            config_dict["base_model_name_or_path"] = (
                getattr(getattr(model, "config", None), "_name_or_path", None) or None
            )
        (staging / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        record = Provenance.model_validate(provenance.record(
            adapter_name=adapter_name,
            peft_type=config.peft_type,
            base_model=provenance.base_fingerprint(model, _targets_of(model, adapter_name)),
            tokenizer_sha256=provenance.tokenizer_hash(tokenizer) if tokenizer is not None else None,
            quantization=model_quantization(model),  # None: a float base
            data_sha256=data_sha256,
            parameters={
                "adapter": sum(t.numel() for t in tensors.values()),
                "model_total": sum(p.numel() for p in model.parameters()),
            },
            training_config=training_config,
            labels=classifier_labels(model, config),
            metrics=metrics,
            **({"derived_from": derived_from} if derived_from is not None else {}),
            files={
                WEIGHTS_NAME: {
                    "sha256": sha256_file(staging / WEIGHTS_NAME),
                    "bytes": (staging / WEIGHTS_NAME).stat().st_size,
                }
            },
        ))  # fmt: skip
        (staging / PROVENANCE_NAME).write_text(record.to_json() + "\n")
        _verify_written(staging / WEIGHTS_NAME, tensors)
    return path


def classifier_labels(model: nn.Module, config: AdapterConfig) -> dict[str, dict] | None:
    """A sequence classifier's class names in transformers' form ({"id2label", "label2id"}), read from the
    model's config, for an adapter trained as one (task_type SEQ_CLS): the head is rebuilt from them on load,
    and a prediction is a name, not an index. None for any other adapter."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if config.task_type != "SEQ_CLS" or not id2label:
        return None
    names = {str(int(i)): str(name) for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
    return {"id2label": names, "label2id": {name: int(i) for i, name in names.items()}}


def saved_label_names(folder: str | Path) -> list[str] | None:
    """The class names, in index order, an adapter folder's deltatune.json records (None: none recorded)."""
    record = read_provenance(Path(folder))
    if record is None or record.labels is None:
        return None
    id2label = record.labels.id2label
    try:
        ordered = sorted(id2label.items(), key=lambda kv: int(kv[0]))
    except (TypeError, ValueError):
        raise AdapterFormatError(f"{folder}: deltatune.json labels.id2label has non-integer ids") from None
    if [int(i) for i, _ in ordered] != list(range(len(ordered))):
        raise AdapterFormatError(
            f"{folder}: deltatune.json labels.id2label ids are not 0..{len(ordered) - 1}"
        )
    return [str(name) for _, name in ordered]


def _verify_written(file: Path, expected: dict[str, torch.Tensor]) -> None:
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(expected):
            raise AdapterFormatError(
                f"{file}: read-back keys differ from what was written: {keys ^ set(expected)}"
            )
        for key in keys:
            tensor = handle.get_tensor(key)
            if tensor.numel() == 0 or not torch.equal(tensor, expected[key]):
                raise AdapterFormatError(f"{file}: tensor {key} did not read back identical; disk problem?")


def read_adapter_weights(
    folder: Path, allow_pickle: bool = False, record: Provenance | None = None
) -> dict[str, torch.Tensor]:
    """Load the weights file of an adapter folder, refusing pickles unless explicitly allowed.

    The safetensors file is read once: parsed, then checked against the sha256 in `record` (deltatune.json)
    when it has one."""
    file = folder / WEIGHTS_NAME
    if not file.exists():
        pickled = folder / PICKLE_WEIGHTS_NAME
        if pickled.exists() and not allow_pickle:
            raise UnsafeFormatError(
                f"{pickled} is a pickle file, which can run arbitrary code when loaded. Convert it to safetensors, "
                "or pass allow_pickle=True if you trust its origin (it is then read with weights_only=True)."
            )
        if pickled.exists():
            return torch.load(pickled, map_location="cpu", weights_only=True)
        raise AdapterNotFoundError(
            f"{folder}: no {WEIGHTS_NAME} (nor {PICKLE_WEIGHTS_NAME}) in the adapter folder"
        )
    data = file.read_bytes()
    try:
        state = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise AdapterFormatError(
            f"{file}: cannot be read as safetensors ({type(exc).__name__}: {exc}); the file is truncated or "
            "corrupted. Re-download or re-save the adapter."
        ) from exc
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise AdapterFormatError(
            f"{file}: zero-size tensor(s) {empty[:3]}; the adapter was saved incorrectly"
        )
    expected = record.file_sha256(WEIGHTS_NAME) if record is not None else None
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise AdapterFormatError(f"{file}: contents changed since saving (sha256 mismatch)")
    check_finite(state, file)
    return state


def check_finite(state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Refuse weights holding NaN or inf: loaded, they would turn every output of the adapter into NaN."""
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise AdapterFormatError(
            f"{source}: tensor(s) {broken[:3]}{' ...' if len(broken) > 3 else ''} hold NaN or inf values; the "
            "adapter is broken (diverged training, or a damaged export). Re-train or re-export it"
        )


def read_provenance(folder: Path) -> Provenance | None:
    file = folder / PROVENANCE_NAME
    if not file.exists():
        return None
    record = read_json_object(file, "a provenance record", AdapterFormatError)
    problem = provenance.schema_problem(record.get("schema_version"))
    if problem:
        raise AdapterFormatError(
            f"{file} {problem}. (Without the file the folder loads as a plain PEFT adapter, its base unchecked.)"
        )
    return Provenance.parse(record, str(file))


def resolve_adapter_folder(path: str | Path) -> Path:
    """`path` as an adapter folder, or an error saying what it is instead (missing, a file)."""
    folder = Path(path)
    if not folder.exists():
        raise AdapterNotFoundError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise AdapterFormatError(
            f"{folder} is a file; load_adapter expects the folder that contains {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not (folder / CONFIG_NAME).exists():
        raise AdapterNotFoundError(f"{folder}: no {CONFIG_NAME}; is this an adapter folder?")
    return folder


def resolve_safetensors_adapter(path: str | Path) -> Path:
    """`resolve_adapter_folder`, and its weights must be safetensors: the reports hash that file and never
    read a pickle."""
    folder = resolve_adapter_folder(path)
    if not (folder / WEIGHTS_NAME).is_file():
        raise AdapterNotFoundError(f"{folder} has no {WEIGHTS_NAME}; is it an adapter folder?")
    return folder


def load_adapter(
    model: nn.Module,
    path: str | Path,
    adapter_name: str = "default",
    *,
    allow_base_mismatch: bool = False,
    allow_pickle: bool = False,
    is_trainable: bool = False,
    tokenizer: Any = None,
    tokenizer_sha256: str | None = None,
) -> nn.Module:
    """Inject the adapter saved at `path` into `model` and load its weights; it becomes the active adapter.

    With deltatune.json present, the model must be the base the adapter was trained on (same architecture,
    shapes, and targeted weights), and `tokenizer`, if given, the tokenizer it was saved with, unless
    `allow_base_mismatch=True`. `tokenizer_sha256` (`provenance.tokenizer_hash(tokenizer)`, for a caller
    loading many adapters) replaces hashing the tokenizer again, ~20 ms for a 50k vocabulary.
    """
    folder = resolve_adapter_folder(path)
    config = load_config_file(folder / CONFIG_NAME)
    record = read_provenance(folder)
    state = read_adapter_weights(folder, allow_pickle=allow_pickle, record=record)
    merged = merged_adapter_names(model)
    if merged:
        raise AdapterFormatError(
            f"adapters {merged} are merged into the model; unmerge before loading another"
        )
    if record is not None:  # a different base shows here before targeting fails on it less clearly
        _check_base_shape(model, record, allow_base_mismatch, folder)
    previously_active = active_adapters(model)
    with patterns.match_budget():
        # sizes the config implies are checked against the file before anything is allocated for them
        get_method(config.peft_type).check_saved_state(model, config, state, str(folder))
        with weights_follow():  # every tensor is overwritten below, or the adapter is deleted again
            inject(model, config, adapter_name)
    try:
        if record is not None:
            check_base(
                model, record, adapter_name, allow_base_mismatch, folder, tokenizer, None, tokenizer_sha256
            )
        load_adapter_state_dict(model, state, adapter_name, source=str(folder / WEIGHTS_NAME))
    except Exception:
        delete_adapter(model, adapter_name)
        if previously_active:
            set_adapter(model, previously_active)
        raise
    if not is_trainable:
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(False)
    return model


def _check_base_shape(model: nn.Module, record: Provenance, allow: bool, folder: Path) -> None:
    """Before injecting: the model is of the architecture the adapter was trained on and has the modules it
    targeted. The full comparison (shapes, weight hashes) follows once the adapter is in place."""
    saved = record.base_model
    if allow or saved is None:
        return
    problems = []
    if saved.architecture and saved.architecture != provenance.architecture(model):
        problems.append(
            f"architecture {saved.architecture} (adapter) vs {provenance.architecture(model)} (model)"
        )
    names = dict(model.named_modules())
    targets = saved.targets
    # a parameter wrapper nested in another is recorded under its place inside it ("experts.base_layer")
    absent = [name for name in targets if unwrapped_name(name) not in names]
    if absent:
        problems.append(
            f"{len(absent)} of the {len(targets)} modules it adapts are not in the model (e.g. {absent[0]})"
        )
    if problems:
        trained_on = saved.name_or_path or saved.architecture
        raise BaseModelMismatchError(
            f"{folder} was trained on a different base model ({trained_on}): {'; '.join(problems)}. Load the base "
            "it was trained on, or pass allow_base_mismatch=True (--allow-base-mismatch) to load it anyway."
        )


def check_base(
    model: nn.Module,
    record: Provenance,
    adapter_name: str,
    allow: bool,
    folder: Path,
    tokenizer: Any = None,
    current: dict[str, Any] | None = None,
    tokenizer_sha256: str | None = None,
) -> None:
    """Refuse (or with `allow`, warn about) an adapter whose recorded base differs from `model`. `current`
    (the model's fingerprint for this adapter's targets) and `tokenizer_sha256` (the tokenizer's hash) are
    for callers that computed them already."""
    saved = record.base_model.fingerprint() if record.base_model is not None else {}
    if current is None:
        current = provenance.base_fingerprint(model, _targets_of(model, adapter_name))
    problems, notes = provenance.compare_fingerprints(saved, current)
    saved_tokenizer = record.tokenizer_sha256
    if tokenizer_sha256 is None and tokenizer is not None and saved_tokenizer:
        tokenizer_sha256 = provenance.tokenizer_hash(tokenizer)
    if saved_tokenizer and tokenizer_sha256 is not None and tokenizer_sha256 != saved_tokenizer:
        problems.append(
            "the tokenizer differs from the one saved with the adapter (vocabulary or special tokens)"
        )
    for note in notes:
        warnings.warn(f"{folder}: {note}", DeltatuneWarning, stacklevel=3)
    if problems and not allow:
        raise BaseModelMismatchError(
            f"{folder} was trained on a different base model: "
            + "; ".join(problems[:5])
            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Load the base it was trained on, or pass allow_base_mismatch=True to load it anyway."
        )
    if problems:
        warnings.warn(
            f"{folder}: loading onto a different base model: {'; '.join(problems[:3])}",
            DeltatuneWarning,
            stacklevel=3,
        )


def load_config(path: str | Path) -> AdapterConfig:
    return load_config_file(resolve_adapter_folder(path) / CONFIG_NAME)
