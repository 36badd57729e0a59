"""The training loop: micro-batches with gradient accumulation, mixed precision, clipping, periodic
evaluation with early stopping on a validation metric (the best adapter is what gets kept), resumable
checkpoints, and a clear stop on a non-finite loss."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..core.io import save_adapter, staged_folder
from ..core.provenance import environment, now_utc
from ..core.summary import TrainableSummary, trainable_summary
from ..data.dataset import DataSplits
from .batching import collate, micro_batch_indices
from .checkpoint import (
    CheckpointError,
    fault_point,
    list_checkpoints,
    load_checkpoint,
    remove_stale_staging,
    save_checkpoint,
)
from .config import TrainConfig
from .distributed import Dist, all_mean, barrier, wrap_model
from .evaluate import task_loss, validation_metrics
from .reporting import MetricsLog, peak_rss_mib, plot_curves, progress_bar, write_text_atomic


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
    train_seconds: float = 0.0
    seconds_per_step: float = 0.0  # the median: robust to a slow first step and to evaluation pauses
    mean_seconds_per_step: float = 0.0
    peak_rss_mib: float = 0.0
    trainable: TrainableSummary | None = None


def write_summary(result: RunResult, path: Path) -> None:
    """summary.json: what a comparison across runs needs (counts, speed, memory, best metrics)."""
    t = result.trainable
    record = {
        "steps": result.steps, "best_step": result.best_step, "best_metric": result.best_metric,
        "stopped_early": result.stopped_early, "validation": result.validation,
        "train_seconds": result.train_seconds, "seconds_per_step": result.seconds_per_step,
        "mean_seconds_per_step": result.mean_seconds_per_step,
        "peak_rss_mib": result.peak_rss_mib, "saved_to": str(result.saved_to),
        "trainable_params": t.trainable if t else None, "total_params": t.total if t else None,
        "trainable_percent": t.percent if t else None,
    }  # fmt: skip
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=o.lr, weight_decay=o.weight_decay, relative_step=False, scale_parameter=False
        )
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        splits: DataSplits,
        info: Dist,
        device: torch.device,
    ):
        self.cfg, self.tokenizer, self.splits, self.info, self.device = cfg, tokenizer, splits, info, device
        self.model = model.to(device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise DeltatuneError("nothing to train: no parameter requires grad after preparing the model")
        self.optimizer = build_optimizer(cfg, self.params)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            cfg.optim.scheduler,
            self.optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.training.max_steps,
        )
        fp16 = cfg.training.precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.classification = cfg.model.task == "classification"
        self.lengths = tuple(len(e.input_ids) for e in splits.train)
        self.out = Path(cfg.output_dir)
        self.log = MetricsLog(self.out / "metrics.jsonl", info.is_main)
        self.saved_to = self.out / ("model" if cfg.adapter.method == "full" else "adapter")

    # --- pieces ----------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        precision = self.cfg.training.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _train_step(self, model: nn.Module, step: int) -> tuple[float, int]:
        t = self.cfg.training
        accum = t.grad_accum
        losses, tokens = [], 0
        for a in range(accum):
            idx = micro_batch_indices(
                len(self.splits.train),
                t.seed,
                step,
                a,
                t.batch_size,
                accum,
                self.info.rank,
                self.info.world_size,
                self.lengths,
                t.length_grouping_steps,
            )
            batch = collate(
                [self.splits.train[i] for i in idx], self.tokenizer.pad_token_id, self.classification
            )
            batch = {k: v.to(self.device) for k, v in batch.items()}
            last = a == accum - 1
            sync = contextlib.nullcontext() if last or not self.info.enabled else model.no_sync()
            with sync:
                with self.autocast():
                    loss_sum, count, _ = task_loss(model, batch, self.classification)
                loss = loss_sum / max(count, 1)
                mean_loss = all_mean(loss.detach(), self.info)  # every rank sees the same verdict below
                if not torch.isfinite(mean_loss):
                    raise NonFiniteLossError(self._non_finite_message(step + 1, float(mean_loss)))
                self.scaler.scale(loss / accum).backward()
            losses.append(float(mean_loss))
            tokens += int(batch["attention_mask"].sum())
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), tokens * self.info.world_size

    def _non_finite_message(self, step: int, value: float) -> str:
        ckpts = list_checkpoints(self.out / "checkpoints")
        where = (
            f"the last good checkpoint is {ckpts[-1]} (continue with --resume)"
            if ckpts
            else "no checkpoint was written yet"
        )
        return (
            f"training loss is {value} at step {step}; stopped. {where}. Try a lower optim.lr, "
            "optim.max_grad_norm, or precision: fp32."
        )

    def _evaluate(self, step: int) -> dict[str, float]:
        metrics, _ = validation_metrics(
            self.model, self.tokenizer, self.splits.validation, self.cfg.eval,
            classification=self.classification, n_classes=len(self.splits.label_names or []),
            device=self.device, autocast=self.autocast,
        )  # fmt: skip
        self.log.write({"step": step, "split": "validation", **metrics})
        return metrics

    def _consider(self, step: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        """Keep the weights when the watched metric improved; count patience otherwise."""
        value = metrics[self.cfg.eval.metric]
        best = state["best"]
        better = best is None or (value < best if self.cfg.metric_mode == "min" else value > best)
        if better:
            state.update(best=value, best_step=step, bad_evals=0, best_metrics=metrics)
            self._save_weights(step, metrics)
        else:
            state["bad_evals"] += 1
            patience = self.cfg.eval.early_stopping_patience
            state["stopped_early"] = bool(patience and state["bad_evals"] >= patience)

    def _save_weights(self, step: int, metrics: dict[str, float]) -> None:
        if self.info.is_main:
            record = {"step": step, **metrics}
            if self.cfg.adapter.method == "full":
                self._save_full_model(record)
            else:
                save_adapter(
                    self.model,
                    self.saved_to,
                    tokenizer=self.tokenizer,
                    training_config=self.cfg.to_dict(),
                    metrics=record,
                    data_sha256=self.splits.data_sha256,
                )
        barrier(self.info)

    def _save_full_model(self, metrics: dict[str, Any]) -> None:
        with staged_folder(self.saved_to) as staging:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            provenance = {
                "created_at": now_utc(), "method": "full", "training_config": self.cfg.to_dict(),
                "metrics": metrics, "data_sha256": self.splits.data_sha256, "environment": environment(),
            }  # fmt: skip
            (staging / "deltatune.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")

    def _checkpoint(self, step: int, state: dict[str, Any]) -> None:
        if self.info.is_main:
            state = {**state, "scaler": self.scaler.state_dict()}
            save_checkpoint(
                self.out / "checkpoints",
                step,
                self.model,
                self.optimizer,
                self.scheduler,
                state,
                self.cfg.training.keep_checkpoints,
            )
        barrier(self.info)

    def _restore(self) -> dict[str, Any]:
        remove_stale_staging(self.out / "checkpoints")
        ckpts = list_checkpoints(self.out / "checkpoints")
        if not ckpts:
            raise CheckpointError(
                f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume"
            )
        state = load_checkpoint(ckpts[-1], self.model, self.optimizer, self.scheduler)
        self.scaler.load_state_dict(state.pop("scaler"))
        return state

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        t = self.cfg.training
        state: dict[str, Any] = {
            "step": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "stopped_early": False,
            "best_metrics": {},
        }
        if resume:
            state = self._restore()
        self.log.truncate_after(state["step"])
        model = wrap_model(self.model, self.info, self.device)
        bar = progress_bar(t.max_steps, state["step"], t.progress and self.info.is_main)
        every, started, step_times = self.cfg.eval.every, time.perf_counter(), []
        while state["step"] < t.max_steps and not state["stopped_early"]:
            tick = time.perf_counter()
            loss, tokens = self._train_step(model, state["step"])
            state["step"] = step = state["step"] + 1
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
                    }
                )
            if (every and step % every == 0) or step == t.max_steps:
                self._consider(step, self._evaluate(step), state)
            if (
                (t.checkpoint_every and step % t.checkpoint_every == 0)
                or step == t.max_steps
                or state["stopped_early"]
            ):
                self._checkpoint(step, state)
            fault_point("step", step)
        bar.close()
        result = RunResult(
            output_dir=self.out,
            saved_to=self.saved_to,
            steps=state["step"],
            best_step=state["best_step"],
            best_metric=state["best"],
            stopped_early=state["stopped_early"],
            validation=state["best_metrics"],
            train_seconds=time.perf_counter() - started,
            seconds_per_step=sorted(step_times)[len(step_times) // 2] if step_times else math.nan,
            mean_seconds_per_step=sum(step_times) / len(step_times) if step_times else math.nan,
            peak_rss_mib=peak_rss_mib(),
            trainable=trainable_summary(self.model),
        )
        if self.info.is_main:
            plot_curves(self.log.records(), self.out / "curves.png", self.cfg.eval.metric)
            write_summary(result, self.out / "summary.json")
        return result
