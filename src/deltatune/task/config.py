"""The training YAML, validated: every section is a pydantic model that forbids unknown keys, so a typo is an
error that names the key and the keys allowed there, never a silently ignored setting."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.capabilities import Capability, method_refusal
from ..core.errors import ConfigError
from ..core.section import Section
from ..data.spec import DataSpec
from ..models.spec import ModelSpec, QuantSpec
from ..trackers.registry import TRACKERS
from .objectives import DATA_FORMATS, LOSS_TYPES, OBJECTIVES, LossType, misplaced_setting


def resolve_precision(precision: str, device: Any) -> str:
    """`training.precision` as it runs on `device` (a torch.device): "auto" is bf16 on a CUDA device that
    supports it, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16"
    return "fp32"


TRACKER_NAMES = tuple(TRACKERS)
FULL_FINE_TUNING = "full"  # the adapter.method that is no adapter
_FORMAT_FIELDS = {
    "preference": "prompt, chosen and rejected",
    "unpaired_preference": "prompt, completion and label (true for a desirable answer)",
    "instruction": "instruction and output (or data.instruction_template and output_template): the prompt, and "
    "the reference answer the rewards check",
}


class AdapterSpec(Section):
    """`method: full` trains every parameter; otherwise the remaining keys are the method's config fields
    (for LoRA: r, lora_alpha, target_modules, use_dora, use_rslora, ...), validated by that method."""

    model_config = ConfigDict(extra="allow")
    method: str = "lora"

    @property
    def full(self) -> bool:
        """Full fine-tuning: every weight trains and the run saves a whole model, not a delta."""
        return self.method == FULL_FINE_TUNING


class OptimSpec(Section):
    name: Literal["adamw", "sgd", "adafactor"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)


class FsdpSpec(Section):
    """FSDP2 options (training.distributed: fsdp): each decoder block is one shard unit."""

    # True: free each block's gathered weights after its forward and gather again for backward (least memory);
    # False: keep them until backward (one all-gather less per block, more memory).
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # keep the shards (and optimizer state) in CPU memory; for GPUs short of memory


class RewardSpec(Section):
    """One GRPO reward (task/rewards.py): a built-in name or module:function, its weight in the sum, and the
    keyword options it is called with (regex: pattern; length_penalty: max_tokens, soft_tokens)."""

    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class TrainingSpec(Section):
    max_steps: int = Field(gt=0)
    batch_size: int = Field(8, gt=0)  # per process, per micro-step
    grad_accum: int = Field(1, gt=0)
    # auto: bf16 autocast on a GPU that supports bf16, fp32 otherwise.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    # 0: off. N: batch the examples of each N consecutive steps by length (less padding, same examples).
    length_grouping_steps: int = Field(0, ge=0)
    # Run the leading tokens every row of a batch shares (chat template, system prompt, instruction) once per
    # batch instead of once per row; same loss and gradients up to float rounding. Where a run cannot use it
    # (see task/shared_prefix.py: `unavailable`), it runs without and says why.
    shared_prefix: bool = False
    seed: int = 0
    checkpoint_every: int | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    progress: bool = True
    device: str = "auto"  # auto: cuda (this rank's GPU) when available, else cpu
    # Under torchrun: ddp keeps the whole model on every rank; fsdp shards it (FSDP2 `fully_shard`) so a model
    # that fits no single device trains. A single process ignores it.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec)
    # What the run optimises (train/objectives.py): sft, next-token loss on the answers; dpo, ipo, orpo, simpo
    # on preference pairs; kto on answers marked desirable or not. The settings below are TRL's names; each
    # belongs to the objectives that read it, and is an error for another.
    objective: Literal[OBJECTIVES] = "sft"  # type: ignore[valid-type]
    beta: float | None = Field(
        None, ge=0
    )  # > 0 for the preference objectives; grpo: 0 (no reference) allowed
    # dpo: sigmoid | hinge | robust, or a list of them and sft, summed with loss_weights (TRL's multi-loss:
    # [sigmoid, sft] adds the chosen answers' NLL to DPO); grpo: grpo | bnpo | dr_grpo | dapo (train/grpo_loss.py)
    loss_type: LossType | list[LossType] | None = None
    loss_weights: list[float] | None = None  # one per loss_type entry; default 1.0 each
    label_smoothing: float | None = Field(None, ge=0, lt=0.5)
    simpo_gamma: float | None = None
    cpo_alpha: float | None = Field(None, ge=0)
    desirable_weight: float | None = Field(None, gt=0)
    undesirable_weight: float | None = Field(None, gt=0)
    # grpo (TRL's GRPOConfig names): G completions sampled per prompt (training.batch_size counts prompts, so a
    # micro-batch trains on batch_size x G completions; TRL's per-device batch counts completions), their
    # length, temperature and top-p; the clipping range [1 - epsilon, 1 + epsilon_high]; how rewards are scaled
    # into advantages (group | batch | none); and the rewards, each a name or {name, weight, options}.
    num_generations: int | None = Field(None, ge=1)  # 1 is refused with the reason (no group to normalise)
    max_completion_length: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    epsilon: float | None = Field(None, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0)
    scale_rewards: Literal["group", "batch", "none"] | None = None
    # leave completions cut at max_completion_length out of the loss (their reward judged an unfinished answer)
    mask_truncated_completions: bool | None = None
    rewards: list[str | RewardSpec] | None = None
    # Start from a trained adapter (a folder) and keep training it; the preference objectives then take that
    # adapter, frozen, as their reference (the policy the pairs are judged against), not the bare base.
    init_adapter: str | None = None
    # A fine-tune that forgets less: add kl_penalty x KL(base || adapted), per token, on every training batch's
    # prompt tokens (not where the answer is learned), the base being the same model with its adapters off
    # (one more forward, no gradients).
    kl_penalty: float = Field(0.0, ge=0)
    # ... and on this many texts of a general corpus each step (0: the batch's tokens only)
    kl_penalty_corpus: str = "bundled:movie_reviews"  # not news, where `deltatune forgetting` measures
    kl_penalty_texts: int = Field(0, ge=0)
    kl_penalty_max_tokens: int = Field(64, gt=0)
    # false: the general texts alone, leaving the task's own prompts free to move (and the step one forward
    # cheaper: the batch keeps the fused loss and its shared prefix)
    kl_penalty_prompts: bool = True


class ForgettingSpec(Section):
    """The trainer's forgetting monitor: at each evaluation, the mean per-token KL(base || model) on a small
    general corpus (task/kl.py), logged as `forgetting_kl` beside the task metric."""

    corpus: str = "bundled:news"  # .txt (one text per line), .jsonl / .csv with a text column, or bundled:
    texts: int = Field(16, gt=0)
    max_tokens: int = Field(64, gt=0)
    budget: float | None = Field(None, gt=0)  # the most mean KL (nats per token) a kept model may have
    # skip: an evaluation over budget cannot be the kept (best) one; stop: it also ends the run
    over_budget: Literal["skip", "stop"] = "skip"


class EvalSpec(Section):
    every: int | None = Field(None, gt=0)  # None: evaluate once, at the end
    # the validation loss alone this often (and at step 0), between full evaluations: a curve to watch that
    # costs no generation; it neither picks the kept weights nor stops the run (`every` does both)
    loss_every: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    loss_samples: int | None = Field(None, gt=0)  # cap on validation rows for the loss (None: all)
    metric: str = "loss"  # what early stopping and "best" watch
    generate_metrics: list[Literal["exact_match", "json_valid", "json_match"]] = Field(default_factory=list)
    generate_samples: int = Field(64, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0)
    forgetting: ForgettingSpec | None = None


class ReportSpec(Section):
    """Experiment trackers the run reports to (names as transformers' `report_to`); each is an extra."""

    to: list[Literal[TRACKER_NAMES]] = Field(default_factory=list)  # type: ignore[valid-type]
    # MLflow's experiment, W&B's and Trackio's project; None: "deltatune" (in a sweep: the study's name)
    project: str | None = Field(None, min_length=1)
    run_name: str | None = Field(None, min_length=1)  # None: the output folder's name
    dir: str | None = None  # local stores and offline files; None: OUTPUT_DIR/trackers
    artifacts: bool = True  # the saved adapter as an artifact, where the tracker keeps artifacts

    @model_validator(mode="after")
    def _no_repeats(self) -> ReportSpec:
        if len(set(self.to)) != len(self.to):
            raise ValueError(f"report.to names a tracker twice: {self.to}")
        return self


class TrainConfig(Section):
    model: ModelSpec
    data: DataSpec
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    training: TrainingSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)
    quantization: QuantSpec | None = None
    report: ReportSpec = Field(default_factory=ReportSpec)
    output_dir: str = "outputs/run"

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainConfig:
        classification = self.data.format == "classification"
        if classification != (self.model.task == "classification"):
            raise ValueError(
                f"data.format={self.data.format!r} needs model.task="
                f"{'classification' if classification else 'causal_lm'!r}, got {self.model.task!r}"
            )
        self._check_objective()
        if self.training.objective == "grpo" and "metric" not in self.eval.model_fields_set:
            self.eval.metric = "reward"  # GRPO has no held-out loss; its mean reward is what it raises
        allowed = {"loss"} | set(self.eval.generate_metrics)
        allowed |= {"accuracy", "f1"} if classification else set()
        objective = self.training.objective
        allowed |= {"reward_accuracy", "reward_margin"} if objective not in ("sft", "grpo") else set()
        allowed |= {"reward"} if objective == "grpo" else set()
        allowed -= (
            {"loss"} if objective == "grpo" else set()
        )  # its loss is on its own samples: no held-out loss
        if self.eval.metric not in allowed:
            raise ValueError(
                f"eval.metric={self.eval.metric!r} is not computed by this config; choose one of "
                f"{sorted(allowed)} (generation metrics must also be listed in eval.generate_metrics)"
            )
        if classification and self.eval.generate_metrics:
            raise ValueError("eval.generate_metrics apply to generative formats, not classification")
        if self.quantization is not None and self.adapter.full:
            raise ValueError(
                "quantization needs a frozen base: adapter.method=full would train the quantized weights. "
                "Pick an adapter method (e.g. lora) or remove the quantization section."
            )
        if self.quantization is not None and self.training.distributed == "fsdp":
            raise ValueError(
                "quantization with training.distributed=fsdp: FSDP shards each weight as a plain tensor, and a "
                "bitsandbytes 4/8-bit weight keeps its quantization state beside its packed bytes, which a shard "
                "cannot carry. Train the quantized base with distributed: ddp (every rank holds the small "
                "quantized base) or drop the quantization section to shard the float base."
            )
        if self.training.gradient_checkpointing and (reason := self._method_lacks(Capability.CHECKPOINTED)):
            raise ValueError(
                f"adapter.method={self.adapter.method} cannot use training.gradient_checkpointing: {reason}. Turn "
                "checkpointing off or use a method that declares it (lora, ia3, bottleneck, prompt_tuning)."
            )
        return self

    def _method_lacks(self, capability: Capability) -> str | None:
        """Why the adapter section's method cannot `capability` (None: it can, it is `full`, or it is not a
        registered method, which the adapter-section check reports by itself)."""
        from ..core.registry import registered_methods

        method = self.adapter.method.upper()
        if self.adapter.full or method not in registered_methods():
            return None
        return method_refusal(method, capability)

    def _check_loss_types(self) -> None:
        t = self.training
        if t.loss_type is None and t.loss_weights is None:
            return
        several = isinstance(t.loss_type, list)
        types = t.loss_type if several else [t.loss_type or "sigmoid"]  # only dpo reads loss_weights
        allowed = list(LOSS_TYPES.get(t.objective, ()))
        wrong = [kind for kind in types if kind not in allowed]
        if wrong:
            named = f"{t.loss_type}: {', '.join(wrong)}" if several else t.loss_type
            raise ValueError(
                f"training.loss_type={named} is not a loss of objective {t.objective}; choose one of {allowed}"
            )
        if several and (t.objective != "dpo" or not types or len(set(types)) != len(types)):
            raise ValueError(
                f"training.loss_type={t.loss_type}: a list of losses (summed, each weighted by "
                f"training.loss_weights) is for objective dpo, each loss named once, from {allowed}"
            )
        if t.loss_weights is not None and len(t.loss_weights) != len(types):
            raise ValueError(
                f"training.loss_weights={t.loss_weights} gives {len(t.loss_weights)} weight(s) for "
                f"{len(types)} loss(es) in training.loss_type={t.loss_type or 'sigmoid'}: give one weight per loss"
            )

    def _check_objective(self) -> None:
        t = self.training
        problem = misplaced_setting(t.objective, t.model_dump())
        if problem:
            raise ValueError(problem)
        self._check_loss_types()
        if t.beta == 0 and t.objective != "grpo":
            raise ValueError(
                f"training.beta must be > 0 for objective {t.objective}; 0 is allowed for grpo only"
            )
        if t.objective == "grpo":
            self._check_grpo()
        elif t.rewards is not None:
            raise ValueError(
                f"training.rewards score sampled completions for objective grpo, not training.objective="
                f"{t.objective}; remove them or set training.objective: grpo"
            )
        wanted = DATA_FORMATS.get(t.objective)
        if wanted and self.data.format not in wanted:
            raise ValueError(
                f"training.objective={t.objective} learns from data.format {' or '.join(wanted)}, got "
                f"{self.data.format!r}; give it rows of {_FORMAT_FIELDS[wanted[0]]}"
            )
        if self.data.format == "unpaired_preference" and t.objective != "kto":
            raise ValueError(
                "data.format=unpaired_preference (answers marked desirable or not) trains with "
                "training.objective=kto; pairs of chosen and rejected answers are data.format=preference"
            )
        if t.init_adapter and self.adapter.full:
            raise ValueError("training.init_adapter continues an adapter; adapter.method=full has none")
        if t.kl_penalty and (t.objective != "sft" or self.model.task == "classification"):
            raise ValueError(
                f"training.kl_penalty applies to the next-token objective (sft) of a causal LM, not objective "
                f"{t.objective} / task {self.model.task}: the preference objectives already hold the model to its "
                "reference through training.beta"
            )
        if t.kl_penalty and not t.kl_penalty_prompts and not t.kl_penalty_texts:
            raise ValueError(
                "training.kl_penalty_prompts=false with training.kl_penalty_texts=0 leaves the penalty nothing "
                "to hold the model on: set training.kl_penalty_texts to how many general texts to score each step"
            )
        if t.kl_penalty and self.adapter.full:
            raise ValueError(
                "training.kl_penalty with adapter.method=full: the penalty needs the base model's next-token "
                "distribution on every batch, and a full fine-tune overwrites the base, so it would take a second "
                "copy of the whole model in memory. Train an adapter (e.g. method: lora), or watch forgetting "
                "without a penalty with eval.forgetting."
            )

    def _check_grpo(self) -> None:
        t, settings = self.training, self.objective_settings
        if not t.rewards:
            raise ValueError(
                "training.objective=grpo needs training.rewards: a list of built-in names (json_valid, "
                "json_match, exact_match, regex, length_penalty) or module:function, e.g. rewards: [json_match]"
            )
        if settings["num_generations"] < 2:
            raise ValueError(
                "training.num_generations=1 leaves no group to normalise: GRPO's advantage is a completion's reward "
                "against the other samples of its prompt. Use 2 or more (TRL's default is 8)"
            )
        room = self.data.max_length - settings["max_completion_length"]
        if room < 1:
            raise ValueError(
                f"training.max_completion_length={settings['max_completion_length']} leaves no room for a prompt "
                f"under data.max_length={self.data.max_length}; a prompt and its completion must fit in "
                "data.max_length: lower the one or raise the other"
            )
        if self.eval.loss_every:
            raise ValueError(
                "eval.loss_every: objective grpo has no held-out loss (its loss is on its own samples); evaluate "
                "its rewards with eval.every"
            )
        if self.training.distributed == "fsdp":
            raise ValueError(
                "training.objective=grpo with training.distributed=fsdp: each rank samples its own completions, "
                "for a different number of decode steps, and every FSDP forward is a collective all ranks must "
                "join. Use distributed: ddp"
            )
        if settings["beta"] and self.adapter.full:
            raise ValueError(
                "training.objective=grpo with beta > 0 and adapter.method=full: the KL term needs the reference "
                "model at every step, and a full fine-tune overwrites it (a second copy of the model). Train an "
                "adapter, or set training.beta: 0"
            )

    @property
    def objective_settings(self) -> dict[str, Any]:
        """The settings the objective reads, each as given or at its default."""
        from .objectives import resolved_settings

        return resolved_settings(self.training)

    @property
    def metric_mode(self) -> Literal["min", "max"]:
        return "min" if self.eval.metric == "loss" else "max"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=100` -> (["training", "max_steps"], 100); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. training.max_steps=100")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_key(tree: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """tree[path[0]][path[1]]... = value, creating sections on the way; a mapping value replaces the whole
    section. `what` names the setting (an override, a sweep parameter) in the error."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    result = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        set_key(result, path, value, f"override {text!r}")
    return result


def _format_errors(exc: ValidationError, source: str, overrides: list[str] | None = None) -> str:
    lines = [f"invalid training config ({source}):"]
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_keys(error["loc"][:-1])
            lines.append(f"  unknown key {key!r}; allowed here: {', '.join(allowed)}")
        elif error["type"] == "missing":
            lines.append(f"  missing required key {key!r}")
        elif not error[
            "loc"
        ]:  # a check across sections: its message names the keys; the input is the whole file
            lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {error['msg']} (got {error.get('input')!r})")
        lines[-1] += _from_override(key, overrides or [])
    return "\n".join(lines)


def _from_override(key: str, overrides: list[str]) -> str:
    """' (from the override X=Y)' when the command line, not the file, set this key."""
    for text in reversed(overrides):  # the last one wins
        name = text.partition("=")[0].strip()
        if key == name or key.startswith(name + "."):
            return f" (from the command-line override {text!r}, not the file)"
    return ""


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def validate_config(
    raw: dict[str, Any], source: str = "config", overrides: list[str] | None = None
) -> TrainConfig:
    """The whole config checked, the adapter section against its method's fields included, before anything
    heavy (tokenizer, data, model) is loaded."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, overrides)) from None
    from .adapter_section import check_adapter_section  # it imports this module

    if cfg.training.init_adapter and cfg.adapter.model_extra:
        raise ConfigError(
            f"{source}: training.init_adapter {cfg.training.init_adapter} brings its own adapter settings; remove "
            f"{sorted(cfg.adapter.model_extra)} from the adapter section (keep only its method)"
        )
    if cfg.training.objective == "grpo":  # an unknown reward or a failing import: now, before any model loads
        from .rewards import RewardError, load_rewards

        try:
            load_rewards(cfg.training.rewards, cfg.objective_settings["max_completion_length"])
        except RewardError as exc:
            raise ConfigError(f"{source}: training.rewards: {exc}") from None
    try:
        if not cfg.training.init_adapter:
            check_adapter_section(cfg.adapter)
    except ConfigError as exc:
        keys = getattr(exc, "keys", None) or ["method"]
        blame = next((b for k in keys if (b := _from_override(f"adapter.{k}", overrides or []))), "")
        raise ConfigError(f"{source}: {exc}{blame}") from None
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate_config(apply_overrides(raw, overrides or []), str(path), overrides)
