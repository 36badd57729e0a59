"""A readable description of a saved adapter folder, without a base model: `deltatune inspect DIR`."""

from __future__ import annotations

import json
from math import prod
from pathlib import Path

from safetensors import safe_open

from .config import CONFIG_NAME, read_json_object
from .errors import AdapterFormatError, AdapterNotFoundError
from .io import WEIGHTS_NAME, read_provenance
from .record import BaseModelRecord


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def describe_adapter(folder: Path) -> str:
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterNotFoundError(
            f"{folder} has no {CONFIG_NAME}; point at a folder written by save_adapter or PEFT"
        )
    # someone else's download: the bounded readers every loader uses (size, depth, duplicate keys)
    config = read_json_object(folder / CONFIG_NAME, "an adapter config", AdapterFormatError)
    lines = [f"adapter: {folder}", f"method: {config.get('peft_type')}"]
    # Every field that shapes the adapter, whatever the method; bookkeeping and unset fields are left out.
    skip = {
        "peft_type",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
    }
    lines += [
        f"  {k}: {v}" for k, v in sorted(config.items()) if k not in skip and v not in (None, [], {}, "")
    ]
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            count = sum(prod(handle.get_slice(k).get_shape()) for k in handle.keys())  # noqa: SIM118
            n_tensors = len(list(handle.keys()))
        lines.append(
            f"weights: {WEIGHTS_NAME}, {n_tensors} tensors, {count:,} parameters, {_mib(weights.stat().st_size)}"
        )
    record = read_provenance(folder)
    if record is None:
        lines.append("provenance: none (no deltatune.json; written by another tool)")
        return "\n".join(lines)
    total = record.parameters.model_total if record.parameters is not None else None
    if total and weights.is_file():
        lines.append(f"trainable: {count:,} of {total:,} parameters ({100 * count / total:.4f}%)")
    base = record.base_model or BaseModelRecord()
    lines += [
        f"created: {record.created_at}",
        f"base model: {base.architecture} {base.name_or_path or ''} "
        f"(target weights sha256 {str(base.target_weights_sha256 or '')[:16]})",
        f"tokenizer sha256: {record.tokenizer_sha256}",
        f"data sha256: {record.data_sha256}",
        "labels: " + (json.dumps(record.labels.id2label) if record.labels else "none (not a classifier)"),
        f"metrics: {json.dumps(record.metrics)}",
        f"environment: {json.dumps(record.environment)}",
    ]
    if record.sweep is not None:  # best/ of a `deltatune sweep`
        sweep = record.sweep
        lines.append(
            f"sweep: trial {sweep.trial} of study {sweep.study!r} ({sweep.storage}), "
            f"params {json.dumps(sweep.params)}; chosen as {sweep.rule}"
        )
    derived = record.derived_from
    if derived is not None:  # made by `deltatune combine` / `convert`
        sources = ", ".join(f"{s.path} ({str(s.sha256)[:12]})" for s in derived.sources)
        logits = derived.logits or {}
        lines.append(
            f"derived from: {derived.method} of {sources}; parameters {json.dumps(derived.parameters)}; "
            f"max relative truncation error {derived.max_relative_error or 0:.3g}"
            + (
                f"; max |logit error| {logits['max_abs_error']:.3g} against the exact update "
                f"(which moves them by up to {logits['exact_max_abs_effect']:.3g})"
                if logits
                else ""
            )
        )
    if record.training_config:
        lines.append("training config: " + json.dumps(record.training_config, sort_keys=True))
    return "\n".join(lines)
