"""FSDP2 (`training.distributed: fsdp`) through the real trainer under `torchrun --nproc_per_node 2` (gloo):
- two ranks end within 1e-5 of one process with the same effective batch, for LoRA and every other method that
  trains under it, with generation-based evaluation running on the sharded model;
- what it writes is what one process writes: the whole adapter (not rank 0's shard), the same provenance, and
  checkpoints that resume on another number of ranks (killed with SIGKILL, resumed on one process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_resume_and_ddp import ENV, adapter_tensors, run_train
from train_helpers import causal_config, instruction_rows, write_config, write_jsonl

from deltatune.train import ConfigError, load_train_config, train, validate_config

pytestmark = pytest.mark.subprocess
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", instruction_rows(120, 3))


def config(
    tmp_path: Path, model: Path, data: Path, name: str, adapter: dict | None = None, **training
) -> Path:
    raw = causal_config(model, data, tmp_path / name, max_steps=6, checkpoint_every=3, **training)
    if adapter is not None:
        raw["adapter"] = adapter
    raw["eval"] = {
        "every": 3,
        "generate_metrics": ["exact_match"],
        "generate_samples": 4,
        "max_new_tokens": 4,
    }
    return write_config(tmp_path / f"{name}.yaml", raw)


def assert_close(want: dict, got: dict, tolerance: float = 1e-5) -> None:
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert want[key].shape == got[key].shape, key  # the whole tensor, not one rank's shard
        assert (want[key] - got[key]).abs().max() < tolerance, key


def validation_records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == "validation"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_causal_lm, data) -> Path:
    """One process, twice the accumulation: the same examples per step as two ranks."""
    tmp = tmp_path_factory.mktemp("single")
    train(load_train_config(config(tmp, tiny_causal_lm, data, "single", grad_accum=2)))
    return tmp / "single"


def test_two_fsdp_ranks_match_one_process(tmp_path, tiny_causal_lm, data, reference):
    """With gradient checkpointing on the sharded side: its recomputation runs inside backward, where the frozen
    input embedding is deliberately never gathered (shard_model) and each block is gathered on its own."""
    sharded = config(tmp_path, tiny_causal_lm, data, "fsdp", distributed="fsdp", gradient_checkpointing=True)
    result = run_train(sharded, launcher=[*TORCHRUN, "-m", "deltatune"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved:") == 1  # rank 0 alone writes
    assert_close(adapter_tensors(reference), adapter_tensors(tmp_path / "fsdp"))
    step = "checkpoints/step-00000006"
    assert_close(*(read_tensors(out / step / "state.safetensors") for out in (reference, tmp_path / "fsdp")))
    # Evaluation ran on the sharded model: the same losses and the same greedy answers' score.
    for want, got in zip(validation_records(reference), validation_records(tmp_path / "fsdp"), strict=True):
        assert got["exact_match"] == want["exact_match"]
        assert abs(got["loss"] - want["loss"]) < 1e-5
    # Provenance names the model, not FSDP's wrapper class, so the adapter loads into the plain base.
    prov = [
        json.loads((out / "adapter" / "deltatune.json").read_text()) for out in (reference, tmp_path / "fsdp")
    ]
    assert prov[1]["base_model"] == prov[0]["base_model"]
    assert prov[1]["base_model"]["architecture"] == "LlamaForCausalLM"


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(path).items() if not k.startswith("rng.")}


@pytest.mark.parametrize("ranks", [1, 2])
def test_fsdp_run_killed_then_resumed(tmp_path, tiny_causal_lm, data, reference, ranks):
    """Killed after step 5 (checkpoint 3 on disk) while running on 2 ranks; resumed under FSDP on 2 ranks, or by
    a single process, which must take the same examples per step (grad_accum 2). Either way it ends where the
    uninterrupted run ends."""
    sharded = config(tmp_path, tiny_causal_lm, data, "run", distributed="fsdp")
    killed = run_train(sharded, fault="step:5", launcher=[*TORCHRUN, "-m", "deltatune"])
    assert killed.returncode != 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000003"]
    if ranks == 1:
        refused = run_train(sharded, "--resume")
        assert refused.returncode == 2
        assert "2 rank(s) x grad_accum 1 x batch_size 4 = 8 examples per step" in refused.stderr
        assert "resume with training.grad_accum=2" in refused.stderr
        resumed = run_train(sharded, "--resume", "training.grad_accum=2")
    else:
        resumed = run_train(sharded, "--resume", launcher=[*TORCHRUN, "-m", "deltatune"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(adapter_tensors(reference), adapter_tensors(tmp_path / "run"))
    step = "checkpoints/step-00000006"  # the optimizer state too, scattered into shards and gathered back
    assert_close(*(read_tensors(out / step / "state.safetensors") for out in (reference, tmp_path / "run")))


METHODS = {
    "dora": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
    "bottleneck": {"method": "bottleneck", "bottleneck_size": 4, "placement": "feedforward"},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
}  # fmt: skip


def test_every_method_trains_under_fsdp(tmp_path, tiny_causal_lm, data):
    """The other methods, in one torchrun launch (tests/fsdp_driver.py trains the configs in turn)."""
    singles, sharded = [], []
    for name, adapter in METHODS.items():
        singles.append(config(tmp_path, tiny_causal_lm, data, f"{name}-single", adapter, grad_accum=2))
        sharded.append(config(tmp_path, tiny_causal_lm, data, f"{name}-fsdp", adapter, distributed="fsdp"))
    driver = str(Path(__file__).with_name("fsdp_driver.py"))
    launch = subprocess.run([*TORCHRUN, driver, *map(str, sharded)], env=ENV, capture_output=True, text=True,
                            timeout=1800)  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-3000:]
    for name, single in zip(METHODS, singles, strict=True):
        train(load_train_config(single))
        assert_close(adapter_tensors(tmp_path / f"{name}-single"), adapter_tensors(tmp_path / f"{name}-fsdp"))


def test_fsdp_refuses_a_quantized_base(tmp_path, tiny_causal_lm, data):
    """Sharding drops a bitsandbytes weight's quant_state (measured: the forward then fails with "'Parameter'
    object has no attribute 'quant_state'"), so the config is refused before anything loads."""
    raw = yaml.safe_load(config(tmp_path, tiny_causal_lm, data, "q", distributed="fsdp").read_text())
    raw["quantization"] = {"bits": 4}
    with pytest.raises(ConfigError, match=r"quantization with training.distributed=fsdp.*distributed: ddp"):
        validate_config(raw)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-rank gloo group in this process, for what a single rank does with its units."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_frozen_input_embedding_is_never_gathered_in_backward(one_rank_group, tiny_causal_lm):
    """Gradient checkpointing makes the embedding's output require grad, so FSDP would gather the whole
    vocabulary table again in backward (262 MiB at 1.1B, the per-rank peak in bench/README §7) though a lookup's
    backward never reads the frozen weight. The head, which backward does read, is still gathered."""
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import deltatune as dt
    from deltatune.task.config import FsdpSpec
    from deltatune.train.fsdp import shard_model
    from deltatune.train.setup import enable_gradient_checkpointing

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    dt.inject(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    enable_gradient_checkpointing(model)
    shard_model(model, FsdpSpec(), torch.device("cpu"), "fp32")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, FSDPModule) and isinstance(head, FSDPModule)  # units of their own
    gathered_in_backward = {}

    def watch(name):
        def on_grad(module):  # a tensor hook on the output: runs after FSDP's own, registered first
            gathered_in_backward[name] = not isinstance(module.weight, DTensor)

        def after_forward(module, args, out):
            out.register_hook(lambda _: on_grad(module))

        return after_forward

    embedding.register_forward_hook(watch("embedding"))
    head.register_forward_hook(watch("head"))
    ids = torch.arange(3, 19).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert gathered_in_backward == {"embedding": False, "head": True}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    from deltatune.train.loop import _fused_adamw_applies

    assert not _fused_adamw_applies(
        [p for p in model.parameters() if p.requires_grad]
    )  # DTensors: default AdamW
