"""`deltatune train` as a function: config in, trained adapter (or full model) and metrics out."""

from __future__ import annotations

import json
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.atomic import write_text_atomic
from ..core.errors import DeltatuneWarning
from ..core.section import flatten
from ..core.threads import oversubscription
from ..data import load_data
from ..task.config import ConfigError, TrainConfig, load_train_config, validate_config
from ..task.loading import NEW_HEAD_NOTE, load_model, load_tokenizer
from ..task.shared_prefix import shares_in_evaluation
from ..trackers import Reporter, require_trackers
from .checkpoint import CheckpointError, list_checkpoints
from .distributed import Dist, init_distributed, pick_device, shutdown
from .loop import DATA_SUMMARY, NonFiniteLossError, RunResult, Trainer
from .run_record import claim_run
from .setup import enable_gradient_checkpointing, prepare_trainable
from .tracking import closed_on_error, open_reporter

RESOLVED_CONFIG = "config.yaml"
# May change between a run and its resumption without changing what is trained.
# output_dir: a run folder that was moved resumes where it is now. The rank layout (ddp or fsdp, and FSDP's
# options) changes only how the same step is computed; grad_accum may change with the number of ranks as long
# as each step takes the same examples, which the trainer checks against the checkpoint.
RESUME_MUTABLE = {
    "training.max_steps", "training.progress", "training.log_every", "output_dir", "training.grad_accum",
    "training.distributed", "training.fsdp.reshard_after_forward", "training.fsdp.cpu_offload",
    "eval.loss_every",
}  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _write_resolved_config(cfg: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RESOLVED_CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check_resumable(cfg: TrainConfig, out: Path) -> None:
    saved_path = out / RESOLVED_CONFIG
    if not saved_path.exists():
        raise CheckpointError(
            f"--resume: {saved_path} is missing; this folder was not written by a deltatune run"
        )
    saved, current = flatten(yaml.safe_load(saved_path.read_text())), flatten(cfg.to_dict())
    if (
        current.get("data.labels") is None
    ):  # the run wrote the order its data implied; the same data implies it
        current["data.labels"] = saved.get("data.labels")
    differing = sorted(
        k
        for k in saved.keys() | current.keys()
        if k not in RESUME_MUTABLE and not k.startswith("report.") and saved.get(k) != current.get(k)
    )
    if differing:
        raise CheckpointError(
            f"--resume with a config that differs from the run's ({', '.join(differing)}); resume with the "
            f"same settings (only {', '.join(sorted(RESUME_MUTABLE))} and the report section may change)"
        )


def train(cfg: TrainConfig, *, resume: bool = False) -> RunResult:
    """Run (or resume) one training job; under torchrun every process calls this and rank 0 writes."""
    info = init_distributed()
    try:
        out = Path(cfg.output_dir)
        if resume:
            _check_resumable(cfg, out)
        elif list_checkpoints(out / "checkpoints"):
            raise CheckpointError(
                f"{out} already holds checkpoints of a run; pass --resume to continue it, or pick another "
                "output_dir"
            )
        require_trackers(cfg.report.to)  # before the minutes of loading, not after them
        with claim_run(out, info.is_main):
            reporter = open_reporter(cfg, info.is_main)  # prepares while the data and the model load
            with closed_on_error(reporter):
                return _train(cfg, resume, info, reporter)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, resume: bool, info: Dist, reporter: Reporter | None) -> RunResult:
    out = Path(cfg.output_dir)
    if info.is_main:
        _write_resolved_config(cfg, out)
    seed_everything(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, cfg.training.seed, row_check=usable_row(cfg))
    if splits.label_names is not None and cfg.data.labels is None:
        # the head's class order, as the data implied it, becomes part of the run's config
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": splits.label_names})})
        if info.is_main:
            _write_resolved_config(cfg, out)
    if info.is_main:
        print(splits.report.summary(), file=sys.stderr, flush=True)
        write_text_atomic(out / DATA_SUMMARY, json.dumps(splits.report.to_dict(), indent=1) + "\n")
        crowded = oversubscription(torch.get_num_threads())
        if crowded:
            warnings.warn(crowded, DeltatuneWarning, stacklevel=2)
    # resuming, the head's weights come from the checkpoint: saying it starts random would be wrong
    head_note = None if resume else NEW_HEAD_NOTE
    model = load_model(cfg.model, tokenizer, splits.label_names, cfg.quantization, head_note=head_note)
    if cfg.training.init_adapter:
        adapter_config = continue_adapter(model, cfg, tokenizer)
    else:
        adapter_config = prepare_trainable(model, cfg.adapter, cfg.model.task)
    if cfg.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    device = pick_device(cfg.training.device, info)
    return Trainer(cfg, model, tokenizer, splits, info, device, adapter_config, reporter).run(resume=resume)


def usable_row(cfg: TrainConfig) -> Any:
    """GRPO: why a row cannot be trained on (a reward's field missing, a prompt too long to leave room for a
    completion), so the data report names and counts it; None for the other objectives."""
    if cfg.training.objective != "grpo":
        return None
    from ..task.rewards import load_rewards, missing_field
    from .grpo import reward_fields

    completion = cfg.objective_settings["max_completion_length"]
    rewards = load_rewards(cfg.training.rewards, completion)
    room = cfg.data.max_length - completion

    def check(example: Any) -> str | None:
        if len(example.prompt_ids) > room:
            return (
                f"the prompt has {len(example.prompt_ids)} tokens; with training.max_completion_length={completion} "
                f"it does not fit in data.max_length={cfg.data.max_length}"
            )
        return missing_field(rewards, reward_fields(example))

    return check


def continue_adapter(model: torch.nn.Module, cfg: TrainConfig, tokenizer: Any) -> Any:
    """`training.init_adapter`: the saved adapter becomes the one trained; an objective with a reference gets a
    frozen copy of it too, so the pairs are judged against where the run started, not the bare base."""
    from ..core.adapters import adapter_configs, set_adapter
    from ..core.io import load_adapter
    from ..task.objectives import uses_reference
    from .preference import REFERENCE_ADAPTER

    folder = cfg.training.init_adapter
    load_adapter(model, folder, tokenizer=tokenizer, is_trainable=True)
    config = adapter_configs(model)["default"]
    if config.peft_type.lower() != cfg.adapter.method.lower():
        raise ConfigError(
            f"training.init_adapter {folder} is a {config.peft_type} adapter, but adapter.method is "
            f"{cfg.adapter.method}; set adapter.method: {config.peft_type.lower()} (its other settings come from "
            "the folder)"
        )
    if uses_reference(cfg.training.objective, cfg.objective_settings.get("beta")):
        load_adapter(model, folder, REFERENCE_ADAPTER, tokenizer=tokenizer)
    set_adapter(model, "default")
    return config


def evaluate_adapter(
    cfg: TrainConfig, adapter: str | Path | None, *, loss: bool = True, allow_base_mismatch: bool = False
) -> dict[str, Any]:
    """Evaluate the base (adapter=None) or base + adapter on the config's validation split: the loss (unless
    loss=False) and the generation metrics the config lists."""
    from ..core.io import load_adapter, saved_label_names
    from ..task.metrics import validation_metrics

    seed_everything(cfg.training.seed)
    if adapter is not None and cfg.model.task == "classification":
        cfg = _with_adapter_labels(cfg, adapter, saved_label_names(adapter))
    tokenizer = load_tokenizer(cfg.model)
    splits = load_data(cfg.data, tokenizer, cfg.training.seed, row_check=usable_row(cfg))
    print(splits.report.summary(), file=sys.stderr, flush=True)
    untrained = (
        "evaluating the base alone: its classification head is untrained (random), so expect chance level"
    )
    head_note = untrained if adapter is None else None  # else the adapter brings the trained head
    model = load_model(cfg.model, tokenizer, splits.label_names, cfg.quantization, head_note=head_note)
    if adapter is not None:
        load_adapter(model, adapter, tokenizer=tokenizer, allow_base_mismatch=allow_base_mismatch)
        _load_reference(model, cfg, tokenizer)
    device = pick_device(cfg.training.device, Dist())
    model.to(device).eval()
    if cfg.training.objective == "grpo":  # the rewards and generation metrics of one greedy answer per row
        result = grpo_metrics(cfg, model, tokenizer, splits)
        return {**result, "examples": len(splits.validation)}
    preference = cfg.training.objective != "sft"
    metrics, answers = validation_metrics(
        model, tokenizer, splits.validation, cfg.eval, classification=cfg.model.task == "classification",
        n_classes=len(splits.label_names or []), device=device, with_loss=loss and not preference,
        label_names=splits.label_names, share_prefix=shares_in_evaluation(cfg, model),
    )  # fmt: skip
    if preference and loss:
        metrics = preference_metrics(cfg, model, tokenizer, splits, device) | metrics
    result: dict[str, Any] = {**metrics, "examples": len(splits.validation)}
    if answers:
        result |= {"generated": len(answers), "sample_answers": answers[:3]}
    return result


def _load_reference(model: torch.nn.Module, cfg: TrainConfig, tokenizer: Any) -> None:
    """A run that continued `training.init_adapter` judged its pairs against that adapter: so does its eval."""
    from ..core.adapters import set_adapter
    from ..core.io import load_adapter
    from ..task.objectives import uses_reference
    from .preference import REFERENCE_ADAPTER

    if cfg.training.init_adapter and uses_reference(
        cfg.training.objective, cfg.objective_settings.get("beta")
    ):
        load_adapter(model, cfg.training.init_adapter, REFERENCE_ADAPTER, tokenizer=tokenizer)
        set_adapter(model, "default")


def preference_metrics(
    cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, splits: Any, device: Any
) -> dict:
    """`deltatune eval` of a preference config: the objective's loss, reward accuracy and margin on the held-out
    pairs, the reference being the model with its adapters off (a bare base scores rewards of 0)."""
    from ..core.adapters import all_wrappers
    from .preference import PreferenceObjective, prompt_once_unavailable

    has_adapters = any(True for _ in all_wrappers(model))
    objective = PreferenceObjective(
        cfg.training.objective, cfg.objective_settings, pad_id=tokenizer.pad_token_id,
        batch_size=cfg.training.batch_size, prompt_once=prompt_once_unavailable(cfg, model, False) is None,
        precompute=not has_adapters, train=[], validation=splits.validation,
    )  # fmt: skip
    if not has_adapters:  # the base is its own reference
        objective.keep_reference(model, device, cfg.eval.batch_size)
    return objective.evaluate(model, device, cfg.eval.batch_size, cfg.eval.loss_samples)


def grpo_metrics(cfg: TrainConfig, model: torch.nn.Module, tokenizer: Any, splits: Any) -> dict[str, Any]:
    """`deltatune eval` of a GRPO config: each validation row's greedy answer, scored by the config's rewards
    (their weighted mean, `reward`, and each one's), and the generation metrics the eval section lists."""
    from ..task.rewards import load_rewards
    from .grpo import GRPOObjective

    settings = cfg.objective_settings
    objective = GRPOObjective(
        settings, load_rewards(cfg.training.rewards, settings["max_completion_length"]), tokenizer, train=[],
        validation=splits.validation, seed=cfg.training.seed, prompt_once=False, distributed=False,
    )  # fmt: skip
    return objective.evaluate(model, cfg.eval)


def _with_adapter_labels(cfg: TrainConfig, adapter: str | Path, saved: list[str] | None) -> TrainConfig:
    """Score with the class order the adapter's head was trained with, whatever the data holds."""
    if saved is None:
        return cfg
    if cfg.data.labels is not None and list(cfg.data.labels) != saved:
        raise ConfigError(
            f"data.labels {cfg.data.labels} differ from the labels {adapter} was trained with: {saved}"
        )
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": saved})})


__all__ = [
    "RESOLVED_CONFIG", "CheckpointError", "ConfigError", "NonFiniteLossError", "RunResult", "TrainConfig", "evaluate_adapter",
    "load_train_config", "train", "validate_config",
]  # fmt: skip
