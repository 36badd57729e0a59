"""Tiny random-initialised models (llama-, gpt2-, bert-shaped, and a CNN with a Conv2d subclass) and the
LoRA variants the contract suite runs over. Everything is seeded, so failures reproduce."""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# The experiment trackers' stores, caches and settings go to one temporary folder per session, never the
# user's home or server: set before any test imports a tracker (Trackio reads TRACKIO_DIR at import), and the
# variables that would send runs elsewhere are dropped.
_TRACKERS_HOME = Path(tempfile.mkdtemp(prefix="deltatune-test-trackers-"))
atexit.register(shutil.rmtree, _TRACKERS_HOME, ignore_errors=True)
for _variable in (
    "TRACKIO_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_DATA_DIR",
    "WANDB_ARTIFACT_DIR",
):
    os.environ[_variable] = str(_TRACKERS_HOME / _variable.lower())
for _variable in (
    "MLFLOW_TRACKING_URI",
    "WANDB_MODE",
    "WANDB_API_KEY",
    "TRACKIO_SPACE_ID",
    "TRACKIO_SERVER_URL",
):
    os.environ.pop(_variable, None)


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet-style conv: pads in forward with a fixed ZeroPad2d, then convolves with padding=0.
    HF PEFT's LoRA breaks on it (its lora_A conv does not see the static padding)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, image_size: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, bias=True)
        pad = max((math.ceil(image_size / stride) - 1) * stride + kernel_size - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.seq = nn.Conv1d(8, 6, 3, padding=1)
        self.stem = Conv2dStaticSamePadding(3, 6, 3, image_size=8, stride=2)
        self.conv = nn.Conv2d(6, 6, 3, padding=1, dilation=1)
        self.head = nn.Linear(6 + 6, 4)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        image = F.relu(self.conv(F.relu(self.stem(inputs["image"])))).mean(dim=(2, 3))
        tokens = self.seq(self.embed(inputs["ids"]).transpose(1, 2)).mean(dim=2)
        return self.head(torch.cat([image, tokens], dim=1))


@dataclass
class Case:
    """A model family: how to build it, feed it, and which modules the contract suite targets."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    run: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    targets: list[str] | str
    modules_to_save: list[str] | None = None
    peft_compatible: bool = True
    extra: dict = field(default_factory=dict)


def _hf_run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _random_biases(model: nn.Module) -> nn.Module:
    """transformers initialises biases to zero; non-zero ones let the contract suite see whether a method
    (IA3 rescales outputs) handles the bias in merge and export."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
    return model


def build_llama(hidden: int = 32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def build_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return _random_biases(
        GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    )


def build_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
        max_position_embeddings=32,
    )
    return _random_biases(BertForSequenceClassification(cfg).eval())


def build_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN().eval()


def _tokens(batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 96, (batch, length), generator=g)}


def _cnn_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(2, 3, 8, 8, generator=g), "ids": torch.randint(0, 11, (2, 5), generator=g)}


CASES = {
    "llama": Case(
        "llama",
        build_llama,
        _tokens,
        _hf_run,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
    ),
    "gpt2": Case("gpt2", build_gpt2, _tokens, _hf_run, ["c_attn", "c_proj", "c_fc", "wpe"]),
    "bert": Case(
        "bert", build_bert, _tokens, _hf_run, ["query", "value", "dense"], modules_to_save=["classifier"]
    ),
    "cnn": Case(
        "cnn",
        build_cnn,
        _cnn_inputs,
        lambda m, x: m(x),
        ["embed", "seq", "stem", "conv", "head"],
        peft_compatible=False,
    ),
}

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


def lora_config(case: Case, variant: str, **overrides):
    from deltatune import LoraConfig

    kwargs = dict(
        r=4,
        lora_alpha=8,
        target_modules=case.targets,
        modules_to_save=case.modules_to_save,
        init_lora_weights=False,
    )
    kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


# IA3 wraps Linear / Conv1D only: per case, its targets and the feed-forward subset (input scaling).
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], r".*\.layer\.\d+\.output\.dense"),
}
# Every registered method's configs for the contract suite (DESIGN.md rule 10).
CONTRACT_VARIANTS = {
    "LORA": list(VARIANTS),
    "IA3": ["ia3"],
    "BOTTLENECK": ["bottleneck", "bottleneck_linear"],
    "PROMPT_TUNING": ["prompt"],
    "PREFIX_TUNING": ["prefix", "prefix_projection"],
}
VIRTUAL_TOKEN_VARIANTS = {"prompt", "prefix", "prefix_projection"}
NON_MERGEABLE_VARIANTS = VIRTUAL_TOKEN_VARIANTS | {"bottleneck"}


def method_config(case: Case, variant: str, *, identity: bool = False, **overrides):
    """The contract suite's config for `variant`: non-identity init unless `identity`."""
    if variant in VIRTUAL_TOKEN_VARIANTS:
        return _virtual_token_config(case, variant, **overrides)
    if variant.startswith("bottleneck"):
        return _bottleneck_config(case, variant, identity, **overrides)
    if variant != "ia3":
        return lora_config(case, variant, init_lora_weights=identity, **overrides)
    from deltatune.methods.ia3 import Ia3Config

    if case.name not in IA3_TARGETS:
        pytest.skip(f"IA3 wraps Linear / Conv1D only; the {case.name} case targets other layer kinds")
    targets, feedforward = IA3_TARGETS[case.name]
    kwargs = dict(
        target_modules=targets, feedforward_modules=feedforward, modules_to_save=case.modules_to_save,
        init_ia3_weights=identity,
    )  # fmt: skip
    return Ia3Config(**(kwargs | overrides))


def _virtual_token_config(case: Case, variant: str, **overrides):
    import deltatune as dt

    if case.name == "cnn":
        pytest.skip("prompt and prefix tuning need a transformers model (input embeddings, KV cache)")
    kwargs = dict(num_virtual_tokens=3, modules_to_save=case.modules_to_save) | overrides
    if variant == "prompt":
        return dt.PromptTuningConfig(**kwargs)
    if variant == "prefix_projection":
        kwargs |= dict(prefix_projection=True, encoder_hidden_size=8)
    return dt.PrefixTuningConfig(**kwargs)


def _bottleneck_config(case: Case, variant: str, identity: bool, **overrides):
    """ "bottleneck": ReLU (cannot merge); "bottleneck_linear": identity without biases (merges exactly). The
    architecture preset picks the layers, except for the CNN, which has no preset."""
    import deltatune as dt

    kwargs = dict(reduction_factor=4, init_weights=identity, modules_to_save=case.modules_to_save)
    if variant == "bottleneck_linear":
        kwargs |= dict(non_linearity="identity", use_bias=False)
    if case.name == "cnn":
        kwargs |= dict(target_modules=["head"], bottleneck_size=2)
    return dt.BottleneckConfig(**(kwargs | overrides))


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]


# Device-dependent tests take `device`: the CPU always, and CUDA on a machine with a GPU, where
# `pytest -k cuda` runs just those. Without one the CUDA cases are not generated at all (hundreds of skips
# would hide the few that mean something).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def on_device(case: Case, device: torch.device) -> Case:
    """The same family with its model built on `device` and its inputs moved there."""
    if device.type == "cpu":
        return case
    return dataclasses.replace(
        case,
        build=lambda: case.build().to(device),
        inputs=lambda: {k: v.to(device) for k, v in case.inputs().items()},
    )


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    from train_helpers import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from train_helpers import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
