"""What `deltatune bench` and `deltatune forgetting` measure, checked before anything loads (no torch here:
the CLI parses with it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

VARIANTS = ("base", "unmerged", "merged", "quantized")
QUANTIZED_BASES = ("nf4", "int8", "int4")


@dataclass
class LatencySettings:
    batch_sizes: tuple[int, ...] = (1, 4)
    prompt_tokens: int = 64
    new_tokens: int = 16
    reps: int = 5
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0
    # the "quantized" variant's base: nf4 (bitsandbytes 4-bit, QLoRA's serving setup; the quant extra) or
    # int8 / int4 (runtime.weight_only's packed CPU kernels, bf16 activations: what `serve --quantize` runs)
    quantize: str = "nf4"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZED_BASES:
            raise ValueError(f"quantize {self.quantize!r} is not one of {', '.join(QUANTIZED_BASES)}")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        if "base" not in self.variants:
            raise ValueError("the variants must include 'base': every ratio is to it")
        for name in ("prompt_tokens", "reps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be at least 2: time per token is measured after the first")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("batch sizes must be at least 1")


# Prompts a general assistant should answer the same way before and after learning a narrow task; written
# for deltatune, covering facts, instructions, arithmetic, code and open writing.
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in one sentence why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "What is 12 multiplied by 7?",
    "Give me a synonym for 'happy'.",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that returns the square of a number.",
    "Who wrote Romeo and Juliet?",
    "List the days of the week.",
    "What does a thermometer measure?",
    "Describe a cat in two sentences.",
    "How many legs does a spider have?",
    "Suggest a name for a small bakery.",
    "What is the boiling point of water in Celsius?",
    "Summarise the plot of Cinderella in one sentence.",
    "What is the opposite of 'ancient'?",
    "Give one tip for sleeping better.",
    "Which planet is closest to the sun?",
    "Write a short thank-you note to a teacher.",
    "What is photosynthesis?",
    "Convert 3 kilometres to metres.",
    "Name a famous painting by Leonardo da Vinci.",
    "What are the three states of matter?",
)


@dataclass(frozen=True)
class ForgettingSettings:
    texts: int = 64  # general texts scored (each up to max_tokens tokens)
    max_tokens: int = 128
    prompts: int = len(GENERAL_PROMPTS)
    new_tokens: int = 24  # greedy tokens per prompt
    batch_size: int = 8

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
