"""The architecture matrix (tests/architectures.py): 38 tiny random transformers models, each through inject,
training, PEFT both ways, merge and (causal LMs) the decode engine. What does not work is listed here with its
reason, so a change in either direction shows; the README's table is `python tests/architectures.py`."""

from __future__ import annotations

import pytest
from architectures import ARCHITECTURES, run

pytest.importorskip("peft")

STAGES = ["inject", "train", "peft reads ours", "we read peft's", "merge", "engine = generate"]
# architecture -> {stage: how its outcome starts}; every stage not named here must be "ok"
EXPECTED = {
    **{
        name: {"engine = generate": "ok (attention LoRA; expert LoRA runs apart)"}
        for name in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
    },
    # PEFT's all-linear adapts the pooling head's MultiheadAttention out_proj, whose forward never calls it
    "siglip_vision": {"we read peft's": "error: TargetingError: 'head.attention.out_proj' cannot be adapted"},
}


def test_the_matrix_covers_at_least_25_architectures_of_every_kind():
    kinds = {a.kind for a in ARCHITECTURES}
    assert len(ARCHITECTURES) >= 25 and kinds == {"causal", "moe", "seq2seq", "encoder", "vision"}


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_each_architecture_goes_through_every_stage(arch):
    outcome = run(arch)
    expected = EXPECTED.get(arch.name, {})
    for stage, value in outcome.items():
        assert value.startswith(expected.get(stage, "ok")), (stage, value)
    stages = STAGES if arch.kind in ("causal", "moe") else STAGES[:-1]
    failing = [s for s in stages if not expected.get(s, "ok").startswith(("ok", "declined"))]
    assert list(outcome) == (stages[: stages.index(failing[0]) + 1] if failing else stages)
