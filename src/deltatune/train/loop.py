"""The training loop: micro-batches with gradient accumulation, mixed precision, clipping, periodic
evaluation with early stopping on a validation metric (the best adapter is what gets kept), resumable
checkpoints, and a clear stop on a non-finite loss."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import provenance
from ..core.allocator import release_freed_memory, return_large_blocks_to_os
from ..core.atomic import atomic_path, staged_folder, write_text_atomic
from ..core.config import AdapterConfig, read_json_object
from ..core.errors import DeltatuneError
from ..core.io import PROVENANCE_NAME, save_adapter
from ..core.record import Provenance
from ..core.summary import TrainableSummary, trainable_summary
from ..data.dataset import DataSplits
from ..task.batching import collate, micro_batch_indices
from ..task.config import FULL_FINE_TUNING, TrainConfig, resolve_precision
from ..task.loss import task_loss
from ..task.metrics import validation_metrics
from ..task.objectives import uses_reference
from ..task.rewards import load_rewards
from ..task.shared_prefix import unavailable
from ..trackers import Outcome, Reporter, RunDescription
from .checkpoint import (
    CheckpointError,
    fault_point,
    list_checkpoints,
    load_into,
    read_checkpoint,
    remove_stale_staging,
    save_checkpoint,
)
from .distributed import Dist, all_mean, barrier, wrap_model
from .forgetting import KL_KEY, ForgettingMonitor
from .grpo import GRPOObjective, Rollout
from .kl_penalty import KLPenalty
from .preference import PreferenceObjective, prompt_once_unavailable
from .preference_loss import preference_statistics
from .reporting import MetricsLog, peak_rss_mib, plot_curves, progress_bar
from .schedules import learning_rate_schedule
from .tracking import tracker_store

REFERENCE_LOGPS = "reference_logps.safetensors"  # a full fine-tune's kept reference (preference objectives)
DATA_SUMMARY = "data_summary.json"  # the data report of the run, as JSON (rows, malformed, classes)


def majority_baseline(counts: dict[str, int] | None) -> dict[str, Any] | None:
    """What always answering the most common class scores (accuracy), so a trial that learned nothing shows
    as such; None without classes."""
    if not counts or not sum(counts.values()):
        return None
    label = max(counts, key=counts.get)
    return {"label": label, "accuracy": counts[label] / sum(counts.values())}


class NonFiniteLossError(DeltatuneError, FloatingPointError):
    """The loss became NaN or infinite; the run stopped and the last checkpoint is intact."""


@dataclass
class RunResult:
    output_dir: Path
    saved_to: Path  # the adapter folder (or the full model folder for method: full)
    steps: int
    best_step: int | None
    best_metric: float | None
    stopped_early: bool
    validation: dict[str, float] = field(default_factory=dict)  # metrics of the kept (best) weights
    stop_reason: str | None = None
    train_seconds: float = 0.0
    seconds_per_step: float = 0.0  # the median: robust to a slow first step and to evaluation pauses
    mean_seconds_per_step: float = 0.0
    peak_rss_mib: float = 0.0
    trainable: TrainableSummary | None = None
    # classification: the accuracy of always answering the validation split's most common class
    majority_baseline: dict[str, Any] | None = None


@dataclass
class RunState:
    """Where a run is: what a resumable checkpoint carries (as a dict) besides the weights and optimizer."""

    step: int = 0
    best: float | None = None  # the watched metric's best value so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations in a row without improvement
    stopped_early: bool = False
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None  # "patience" | "forgetting budget"
    forgetting: list[float] = field(default_factory=list)  # the monitor's KL at each evaluation

    def judge(
        self, step: int, metrics: dict[str, float], metric: str, mode: str, patience: int | None,
        *, within_budget: bool = True,
    ) -> bool:  # fmt: skip
        """Record an evaluation; True when it is the best so far (the caller keeps those weights). One over
        the forgetting budget is never the best. After `patience` evaluations in a row without improvement
        the run is marked stopped early."""
        value = metrics[metric]
        better = self.best is None or (value < self.best if mode == "min" else value > self.best)
        if better and within_budget:
            self.best, self.best_step, self.bad_evals, self.best_metrics = value, step, 0, metrics
            return True
        self.bad_evals += 1
        if patience and self.bad_evals >= patience:
            self.stopped_early, self.stop_reason = True, "patience"
        return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write_summary(result: RunResult, path: Path) -> None:
    write_text_atomic(path, json.dumps(summary_record(result), indent=2) + "\n")


def summary_record(result: RunResult) -> dict[str, Any]:
    """summary.json: what a comparison across runs needs (counts, speed, memory, best metrics)."""
    t = result.trainable
    return {
        "steps": result.steps, "best_step": result.best_step, "best_metric": result.best_metric,
        "stopped_early": result.stopped_early, "stop_reason": result.stop_reason, "validation": result.validation,
        "train_seconds": result.train_seconds, "seconds_per_step": result.seconds_per_step,
        "mean_seconds_per_step": result.mean_seconds_per_step,
        "peak_rss_mib": result.peak_rss_mib, "saved_to": str(result.saved_to),
        "trainable_params": t.trainable if t else None, "total_params": t.total if t else None,
        "trainable_percent": t.percent if t else None, "majority_baseline": result.majority_baseline,
    }  # fmt: skip


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=o.lr, weight_decay=o.weight_decay, relative_step=False, scale_parameter=False
        )
    fused = True if _fused_adamw_applies(params) else None
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=fused)


def _fused_adamw_applies(params: list[nn.Parameter]) -> bool:
    """torch's fused AdamW updates every tensor in one kernel: 5.5 ms a step against 25 ms for the default
    loop over all-linear r=16 on SmolLM2 (420 tensors) on the 2-core CPU (bench/README §12). It takes plain
    floating-point tensors on one CPU or CUDA device; FSDP's DTensors keep the default."""
    devices = {p.device.type for p in params}
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params)
    return plain and len(devices) == 1 and devices <= {"cpu", "cuda"}


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        splits: DataSplits,
        info: Dist,
        device: torch.device,
        adapter_config: AdapterConfig | None,
        reporter: Reporter | None = None,
    ):
        """`adapter_config`: the adapter being trained, as injected; None for full fine-tuning. `reporter`:
        the trackers of report.to, prepared (their runs open when training starts)."""
        self.cfg, self.tokenizer, self.splits, self.info, self.device = cfg, tokenizer, splits, info, device
        self.reporter = reporter
        self.adapter_config = adapter_config
        self.precision = resolve_precision(cfg.training.precision, device)
        self.sharded = info.enabled and cfg.training.distributed == "fsdp"
        # FSDP is chosen to save memory; on CPU the freed gathers must leave the resident set (bench/README §7)
        self.trim_heap = self.sharded and device.type == "cpu"
        if self.sharded:  # before the optimizer (sharding replaces the parameters by their shards) and before
            from .fsdp import shard_model  # moving the model: the device receives shards, never the whole

            if self.trim_heap:
                return_large_blocks_to_os()
            shard_model(model, cfg.training.fsdp, device, self.precision)
        self.model = model.to(device)
        self.model.train()
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        if not self.params:
            raise DeltatuneError("nothing to train: no parameter requires grad after preparing the model")
        self.optimizer = build_optimizer(cfg, self.params)
        self.scheduler = learning_rate_schedule(
            cfg.optim.scheduler, self.optimizer, cfg.optim.warmup_steps, cfg.training.max_steps
        )
        fp16 = self.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.classification = cfg.model.task == "classification"
        self.share_prefix = cfg.training.shared_prefix
        if self.share_prefix and (why := unavailable(cfg, info.enabled)):
            self.share_prefix = False
            if info.is_main:
                print(f"training.shared_prefix is off for this run: {why}", file=sys.stderr)
        self.lengths = tuple(len(e.input_ids) for e in splits.train)
        self.step_metrics: dict[str, float] = {}
        self.out = Path(cfg.output_dir)
        self.log = MetricsLog(self.out / "metrics.jsonl", info.is_main)
        self.saved_to = self.out / ("model" if adapter_config is None else "adapter")
        self.preference = self._preference_objective(adapter_config is None)
        self.grpo = self._grpo_objective()
        self._rollout: Rollout | None = (
            None  # GRPO: the step's samples, and the part the micro-batch trains on
        )
        self._prompts, self._dapo_tokens = range(0), None
        self.kl_penalty = KLPenalty(cfg.training, tokenizer) if cfg.training.kl_penalty else None
        self._step = 0
        spec = cfg.eval.forgetting
        self.monitor = (
            None
            if spec is None
            else ForgettingMonitor(spec, self.model, tokenizer, full_fine_tuning=adapter_config is None)
        )

    def _preference_objective(self, full: bool) -> PreferenceObjective | None:
        t = self.cfg.training
        if t.objective in ("sft", "grpo"):
            return None
        why = prompt_once_unavailable(self.cfg, self.model, self.info.enabled)
        if why and self.info.is_main:
            print(f"each pair's prompt runs once per answer in this run: {why}", file=sys.stderr)
        return PreferenceObjective(
            t.objective, self.cfg.objective_settings, pad_id=self.tokenizer.pad_token_id,
            batch_size=t.batch_size, prompt_once=why is None, precompute=full,
            train=self.splits.train, validation=self.splits.validation,
        )  # fmt: skip

    def _grpo_objective(self) -> GRPOObjective | None:
        t = self.cfg.training
        if t.objective != "grpo":
            return None
        settings = self.cfg.objective_settings
        why = prompt_once_unavailable(self.cfg, self.model, self.info.enabled)
        if why and self.info.is_main:
            print(
                f"each completion runs with its prompt (not the prompt once per group): {why}",
                file=sys.stderr,
            )
        return GRPOObjective(
            settings, load_rewards(t.rewards, settings["max_completion_length"]), self.tokenizer,
            train=self.splits.train, validation=self.splits.validation, seed=t.seed, prompt_once=why is None,
            distributed=self.info.enabled,
        )  # fmt: skip

    # --- pieces ----------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self, model: nn.Module, step: int) -> tuple[float, int]:
        t = self.cfg.training
        accum = t.grad_accum
        losses, tokens = [], 0
        logged: dict[str, list[float]] = {}
        self._step = step
        batches = [
            micro_batch_indices(
                len(self.splits.train), t.seed, step, a, t.batch_size, accum, self.info.rank,
                self.info.world_size, self.lengths, t.length_grouping_steps,
            )
            for a in range(accum)
        ]  # fmt: skip
        self._rollout = self._sample_step(model, step, batches, logged) if self.grpo is not None else None
        first = 0
        for a, idx in enumerate(batches):
            self._prompts = range(first, first + len(idx))  # this micro-batch's prompts in the rollout
            first += len(idx)
            with self._gradient_sync(model, last=a == accum - 1):
                with self.autocast():
                    loss, batch_tokens = self._micro_batch_loss(model, idx, logged)
                mean_loss = all_mean(loss.detach(), self.info)  # every rank sees the same verdict below
                if not torch.isfinite(mean_loss):
                    raise NonFiniteLossError(self._non_finite_message(step + 1, float(mean_loss)))
                self.scaler.scale(loss / accum).backward()
            losses.append(float(mean_loss))
            tokens += batch_tokens
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_metrics = {k: sum(v) / len(v) for k, v in logged.items()}  # logged with the step's loss
        return sum(losses) / len(losses), tokens * self.info.world_size

    def _micro_batch_loss(
        self, model: nn.Module, idx: list[int], logged: dict[str, list[float]]
    ) -> tuple[torch.Tensor, int]:
        """The objective's mean loss on these training rows, and how many tokens they hold; what the step
        logs beside its loss (a preference objective's rewards, the KL penalty's parts) goes into `logged`."""
        if self.grpo is not None:
            out = self.grpo.loss(model, self._rollout, self._prompts, self.device, self._dapo_tokens)
            parts = {"clip_ratio/low": out.clip_low, "clip_ratio/high": out.clip_high,
                     "clip_ratio/region": out.clip_region} | ({} if out.kl is None else {"kl": out.kl})  # fmt: skip
            for key, value in parts.items():
                logged.setdefault(key, []).append(value)
            return out.loss, self._rollout.tokens(self._prompts)
        if self.preference is not None:
            out, tokens = self.preference.loss_and_tokens(model, "train", idx, self.device)
            for key, value in preference_statistics(out).items():
                logged.setdefault(key, []).append(value)
            return out.loss, tokens
        batch = collate([self.splits.train[i] for i in idx], self.tokenizer.pad_token_id, self.classification)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        tokens = int(batch["attention_mask"].sum())
        if self.kl_penalty is None:
            loss_sum, count, _ = task_loss(model, batch, self.classification, share_prefix=self.share_prefix)
            return loss_sum / max(count, 1), tokens
        loss, parts = self.kl_penalty.task_loss(model, batch, self.share_prefix)
        if self.kl_penalty.per_step:
            general, kl = self.kl_penalty.general_loss(model, self._step, self.device)
            loss, parts = loss + general, parts | {"kl_to_base_general": kl}
        for key, value in parts.items():
            logged.setdefault(key, []).append(value)
        return loss, tokens

    def _sample_step(
        self, model: nn.Module, step: int, batches: list[list[int]], logged: dict[str, list[float]]
    ) -> Rollout:
        """GRPO: this step's completions, for every micro-batch at once (as TRL generates a whole step's), with
        the adapter as it is before the step's update; their reward statistics go into `logged`."""
        rollout = self.grpo.rollout(model, step, [i for idx in batches for i in idx], self.autocast)
        for key, value in rollout.metrics.items():
            logged.setdefault(key, []).append(value)
        # dapo: every completion token of the step, on every rank, weighs alike
        mask_tokens = torch.tensor(float(sum(map(len, rollout.completion_ids))), device=self.device)
        total = all_mean(mask_tokens, self.info) * self.info.world_size
        self._dapo_tokens = float(total) / (self.info.world_size * len(batches))
        return rollout

    def _gradient_sync(self, model: nn.Module, *, last: bool) -> contextlib.AbstractContextManager:
        """Ranks reduce gradients only on the last micro-batch of a step; before it they accumulate locally."""
        if self.sharded:
            model.set_requires_gradient_sync(last)
        elif self.info.enabled and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def _non_finite_message(self, step: int, value: float) -> str:
        ckpts = list_checkpoints(self.out / "checkpoints")
        where = (
            f"the last good checkpoint is {ckpts[-1]} (continue with --resume)"
            if ckpts
            else "no checkpoint was written yet"
        )
        objective = self.cfg.training.objective
        return (
            f"training loss ({objective} objective) is {value} at step {step}; stopped. {where}. Try a lower "
            "optim.lr, optim.max_grad_norm, or precision: fp32."
        )

    def _evaluate(self, step: int, loss_only: bool = False) -> dict[str, float]:
        """The evaluation `eval` asks for, logged; `loss_only`: the validation loss alone (eval.loss_every)."""
        spec = self.cfg.eval.model_copy(update={"generate_metrics": []}) if loss_only else self.cfg.eval
        metrics = self._task_metrics(spec)
        if self.monitor is not None and not loss_only:
            metrics[KL_KEY] = self.monitor.measure(self.model)
        marker = {"loss_only": True} if loss_only else {}  # a sweep's pruner hears only full evaluations
        self.log.write({"step": step, "split": "validation", **metrics, **marker})
        return metrics

    def _task_metrics(self, spec: Any) -> dict[str, float]:
        """What the objective reports on the validation rows under `spec` (an eval section)."""
        if self.grpo is not None:  # its own greedy samples give both the rewards and the generation metrics
            return self.grpo.evaluate(self.model, spec, self.autocast)
        metrics: dict[str, float] = {}
        if self.preference is not None:
            with self.autocast():
                metrics = self.preference.evaluate(
                    self.model, self.device, spec.batch_size, spec.loss_samples
                )
        return metrics | validation_metrics(
            self.model, self.tokenizer, self.splits.validation, spec,
            classification=self.classification, n_classes=len(self.splits.label_names or []),
            device=self.device, autocast=self.autocast, share_prefix=self.share_prefix,
            with_loss=self.preference is None,
        )[0]  # fmt: skip

    def _save_weights(self, step: int, metrics: dict[str, float]) -> None:
        with self._whole_trainables():
            if self.info.is_main:
                record = {"step": step, **metrics}
                if self.adapter_config is None:
                    self._save_full_model(record)
                else:
                    save_adapter(
                        self.model,
                        self.saved_to,
                        tokenizer=self.tokenizer,
                        training_config=self._recorded_config(),
                        metrics=record,
                        data_sha256=self.splits.data_sha256,
                    )
        barrier(self.info)

    def _recorded_config(self) -> dict[str, Any]:
        """The run's config for deltatune.json, with what the objective resolved to: its settings at their
        defaults where not given, and which reference it was judged against."""
        t = self.cfg.training
        reference = None
        if self.grpo is not None and uses_reference(t.objective, self.cfg.objective_settings["beta"]):
            reference = f"adapter {t.init_adapter} (frozen copy)" if t.init_adapter else "base (adapters off)"
        if self.preference is not None and uses_reference(t.objective):
            reference = (
                f"adapter {t.init_adapter} (frozen copy)" if t.init_adapter
                else "base, log-probs kept before step 1" if self.preference.precompute
                else "base (adapters off)"
            )  # fmt: skip
        objective = {"name": t.objective, "settings": self.cfg.objective_settings, "reference": reference}
        return self.cfg.to_dict() | {"objective": objective}

    @contextlib.contextmanager
    def _whole_trainables(self):
        """Under FSDP, the trainable weights gathered whole into rank 0's model for the duration (a collective:
        every rank enters); otherwise nothing to do."""
        if not self.sharded:
            yield
            return
        from .fsdp import gather_weights, whole_parameters

        with whole_parameters(self.model, gather_weights(self.model, self.param_names)):
            yield

    def _save_full_model(self, metrics: dict[str, Any]) -> None:
        with staged_folder(self.saved_to) as staging:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            record = Provenance.model_validate(provenance.record(
                method=FULL_FINE_TUNING, training_config=self._recorded_config(), metrics=metrics,
                data_sha256=self.splits.data_sha256,
            ))  # fmt: skip
            (staging / PROVENANCE_NAME).write_text(record.to_json() + "\n")

    def _checkpoint(self, step: int, state: RunState) -> None:
        if self.sharded:  # a collective: every rank takes part, rank 0 receives the full tensors
            from .fsdp import gather_optimizer_state, gather_weights

            weights = gather_weights(self.model, self.param_names)
            optimizer_state = gather_optimizer_state(self.model, self.optimizer, self.param_names)
        elif self.info.is_main:
            weights, optimizer_state = (
                dict(zip(self.param_names, self.params, strict=True)),
                self.optimizer.state_dict(),
            )
        if self.info.is_main:
            t = self.cfg.training
            layout = {
                "world_size": self.info.world_size,
                "grad_accum": t.grad_accum,
                "batch_size": t.batch_size,
            }
            save_checkpoint(
                self.out / "checkpoints",
                step,
                weights,
                optimizer_state,
                self.scheduler.state_dict(),
                {**state.to_dict(), "scaler": self.scaler.state_dict(), "layout": layout},
                t.keep_checkpoints,
            )
        barrier(self.info)

    def _restore(self) -> RunState:
        remove_stale_staging(self.out / "checkpoints")
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            raise CheckpointError(
                f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume"
            )
        checkpoint = read_checkpoint(ckpts[-1], set(self.param_names))
        saved = checkpoint.trainer_state
        self._check_same_batch(ckpts[-1], saved.pop("layout", None))
        if self.sharded:
            from .fsdp import load_trainable

            load_trainable(
                self.model, self.optimizer, self.param_names, checkpoint.weights, checkpoint.optimizer_state
            )
        else:
            load_into(self.model, self.optimizer, checkpoint)
        self.scheduler.load_state_dict(checkpoint.scheduler_state)
        self.scaler.load_state_dict(saved.pop("scaler"))
        checkpoint.restore_rng()
        state = RunState(**saved)
        if self.info.is_main:
            print(f"resumed from {ckpts[-1].name} (step {state.step})", file=sys.stderr, flush=True)
        return state

    def _check_same_batch(self, folder: Path, layout: dict[str, int] | None) -> None:
        """A run may resume on another number of ranks if each step still consumes the same examples:
        ranks x grad_accum x batch_size must not change (the batch order depends on that product alone)."""
        if layout is None:  # written before the layout was recorded
            return
        t, world = self.cfg.training, self.info.world_size
        before = layout["world_size"] * layout["grad_accum"] * layout["batch_size"]
        if world * t.grad_accum * t.batch_size == before:
            return
        fix = (
            f"resume with training.grad_accum={before // (world * t.batch_size)}"
            if before % (world * t.batch_size) == 0
            else f"resume on a number of ranks that divides {before // t.batch_size}"
        )
        raise CheckpointError(
            f"{folder} was written by {layout['world_size']} rank(s) x grad_accum {layout['grad_accum']} x "
            f"batch_size {layout['batch_size']} = {before} examples per step; {world} rank(s) x grad_accum "
            f"{t.grad_accum} would take {world * t.grad_accum * t.batch_size}, a different run. {fix}"
        )

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        state = self._restore() if resume else RunState()
        if self.reporter is not None:
            self.reporter.start(self._run_description(state.step if resume else None))
            self.log.listener = self.reporter.log_record
        result = self._run(state)
        if self.reporter is not None:
            self.reporter.finish(self._outcome(result))
        return result

    def _run(self, state: RunState) -> RunResult:
        t = self.cfg.training
        if self.preference is not None and self.preference.precompute:
            self._keep_reference()
        self.log.truncate_after(state.step)
        model = self.model if self.sharded else wrap_model(self.model, self.info, self.device)
        bar = progress_bar(t.max_steps, state.step, t.progress and self.info.is_main)
        every, loss_every = self.cfg.eval.every, self.cfg.eval.loss_every
        started, step_times = time.perf_counter(), []
        if loss_every and state.step == 0:  # where the curve starts: the model before any update
            self._evaluate(0, loss_only=True)
        while state.step < t.max_steps and not state.stopped_early:
            tick = time.perf_counter()
            if self.trim_heap:  # the last step's freed activations: ~130 MiB of a rank's peak at 1.1B
                release_freed_memory()
            loss, tokens = self._train_step(model, state.step)
            state.step = step = state.step + 1
            step_times.append(time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / step_times[-1]:.0f}")
            if step % t.log_every == 0 or step == t.max_steps or step == 1:
                lr = self.scheduler.get_last_lr()[0]
                self.log.write(
                    {
                        "step": step,
                        "split": "train",
                        "loss": loss,
                        "lr": lr,
                        "tokens_per_s": tokens / step_times[-1],
                        **self.step_metrics,
                    }
                )
            if (every and step % every == 0) or step == t.max_steps:
                self._judge(step, self._evaluate(step), state)
            elif loss_every and step % loss_every == 0:
                self._evaluate(step, loss_only=True)
            if (
                (t.checkpoint_every and step % t.checkpoint_every == 0)
                or step == t.max_steps
                or state.stopped_early
            ):
                self._checkpoint(step, state)
            fault_point("step", step)
        bar.close()
        result = RunResult(
            output_dir=self.out,
            saved_to=self.saved_to,
            steps=state.step,
            best_step=state.best_step,
            best_metric=state.best,
            stopped_early=state.stopped_early,
            validation=state.best_metrics,
            stop_reason=state.stop_reason,
            train_seconds=time.perf_counter() - started,
            seconds_per_step=sorted(step_times)[len(step_times) // 2] if step_times else math.nan,
            mean_seconds_per_step=sum(step_times) / len(step_times) if step_times else math.nan,
            peak_rss_mib=peak_rss_mib(),
            trainable=trainable_summary(self.model),
            majority_baseline=majority_baseline(self.splits.report.classes.get("validation")),
        )
        if self.info.is_main:
            plot_curves(self.log.records(), self.out / "curves.png", self.cfg.eval.metric)
            write_summary(result, self.out / "summary.json")
        if self.monitor is not None and state.best_step is None and state.forgetting:
            raise self.monitor.nothing_kept(state.forgetting)
        return result

    def _run_description(self, resumed_at: int | None) -> RunDescription:
        report = self.cfg.report
        return RunDescription(
            project=report.project or "deltatune", run_name=report.run_name or self.out.resolve().name,
            store=tracker_store(self.cfg), config=self.cfg.to_dict(),
            data_summary=self.splits.report.to_dict(), resumed_at=resumed_at,
        )  # fmt: skip

    def _outcome(self, result: RunResult) -> Outcome:
        """What the trackers record of a finished run: summary.json, the kept adapter and its provenance."""
        record = self.saved_to / PROVENANCE_NAME
        provenance = read_json_object(record, "a provenance record") if record.is_file() else None
        return Outcome(
            "finished", summary=summary_record(result), provenance=provenance,
            saved_to=self.saved_to if self.saved_to.is_dir() else None, artifacts=self.cfg.report.artifacts,
        )  # fmt: skip

    def _keep_reference(self) -> None:
        """A full fine-tune's reference log-probs: computed before step 1, while the model is the base, and
        kept in the run folder, since a resumed run's model is no longer the base."""
        path = self.out / REFERENCE_LOGPS
        if path.is_file():
            self.preference.kept = load_file(str(path))
            return
        if self.info.is_main:
            print("scoring every pair with the base once: the reference of a full fine-tune", file=sys.stderr)
        with self.autocast():
            self.preference.keep_reference(self.model, self.device, self.cfg.eval.batch_size)
        if self.info.is_main:
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in self.preference.kept.items()}, str(tmp))
        barrier(self.info)

    def _judge(self, step: int, metrics: dict[str, float], state: RunState) -> None:
        """Keep these weights if they are the best so far within the forgetting budget; stop the run when
        patience runs out, or at the first evaluation over budget when the monitor says `stop`."""
        e = self.cfg.eval
        within = True
        if self.monitor is not None:
            state.forgetting.append(metrics[KL_KEY])
            within = self.monitor.within_budget(metrics)
        if state.judge(
            step, metrics, e.metric, self.cfg.metric_mode, e.early_stopping_patience, within_budget=within
        ):
            self._save_weights(step, metrics)
        if not within and e.forgetting.over_budget == "stop":
            state.stopped_early, state.stop_reason = True, "forgetting budget"
