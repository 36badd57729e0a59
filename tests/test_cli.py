"""The `deltatune` command line: inspect, eval and generate on a trained tiny adapter; errors exit with 2."""

from __future__ import annotations

import json

import pytest
from train_helpers import causal_config, instruction_rows, write_config, write_jsonl

from deltatune.cli.main import main
from deltatune.train import train, validate_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_causal_lm):
    root = tmp_path_factory.mktemp("cli")
    data = write_jsonl(root / "d.jsonl", instruction_rows(80, 5))
    raw = causal_config(tiny_causal_lm, data, root / "run", max_steps=6)
    raw["eval"]["generate_metrics"] = ["json_valid"]
    config = write_config(root / "c.yaml", raw)
    return config, train(validate_config(raw))


def test_inspect_prints_config_provenance_and_counts(trained, capsys):
    _, result = trained
    assert main(["inspect", str(result.saved_to)]) == 0
    out = capsys.readouterr().out
    n = result.trainable.trainable
    assert "method: LORA" in out and "r: 4" in out
    assert f"{n:,} parameters" in out
    assert (
        f"trainable: {n:,} of {result.trainable.total:,} parameters ({result.trainable.percent:.4f}%)" in out
    )
    assert "data sha256: " in out and "LlamaForCausalLM" in out


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("adapter_config.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("adapter_config.json", b"{" + b" " * (2 << 20) + b"}", "too large"),
        ("deltatune.json", b"\xff\xfe", "not UTF-8"),
        ("deltatune.json", b'{"schema_version": 99}', "newer than this deltatune reads"),
        ("deltatune.json", b'{"base_model": null}', "has no schema_version: it was written before"),
    ],
)
def test_inspect_reads_a_downloaded_folder_through_the_bounded_readers(
    trained, tmp_path, capsys, name, content, message
):
    """`deltatune inspect` reads other people's folders: a hostile or future file is one clear error line."""
    import shutil

    _, result = trained
    folder = tmp_path / "downloaded"
    shutil.copytree(result.saved_to, folder)
    (folder / name).write_bytes(content)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_reports_the_same_metrics_as_training(trained, capsys):
    config, result = trained
    assert main(["eval", str(config), "--adapter", str(result.saved_to)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["loss"] == pytest.approx(result.validation["loss"], rel=1e-5)
    assert metrics["json_valid"] == pytest.approx(result.validation["json_valid"])
    assert main(["eval", str(config), "--base-only"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["loss"] > metrics["loss"]


def test_generate_with_adapter(trained, tiny_causal_lm, capsys):
    _, result = trained
    args = [
        "generate",
        "--base",
        str(tiny_causal_lm),
        "--adapter",
        str(result.saved_to),
        "--max-new-tokens",
        "4",
    ]
    assert main([*args, "Sentiment of: good day", "Sentiment of: bad day"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    sampled = [*args, "--temperature", "1.5", "--jsonl", "Sentiment of: good day"]
    answers = []
    for seed in ("1", "1", "2", "3", "4"):
        assert main([*sampled, "--seed", seed]) == 0
        answers.append(json.loads(capsys.readouterr().out)["answer"])
    assert answers[0] == answers[1] and len(set(answers)) > 1  # a seed repeats; seeds differ
    assert main([*sampled, "--top-p", "0"]) == 2 and "top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_compiled_answers_as_the_engine_does(trained, tiny_causal_lm, capsys, monkeypatch):
    """`--compile`: the same answers through the compiled step with the adapter inside (frozen weights without
    max-autotune here, to compile in seconds: test_compiled_decode runs the configuration as shipped)."""
    from deltatune.runtime import compiled

    monkeypatch.setattr(compiled, "COMPILE_OPTIONS", {"freezing": True})
    compiles, real_compile = [], compiled.torch.compile
    monkeypatch.setattr(
        compiled.torch, "compile", lambda fn, **kw: compiles.append(fn) or real_compile(fn, **kw)
    )
    _, result = trained
    args = ["generate", "--base", str(tiny_causal_lm), "--adapter", str(result.saved_to), "--jsonl"]
    prompts = ["Sentiment of: good day", "Sentiment of: bad day", "Sentiment of: good day"]
    answers = []
    for extra in ([], ["--compile"]):
        assert main([*args, *extra, "--max-new-tokens", "12", *prompts]) == 0
        answers.append([json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()])
    assert answers[1] == answers[0] and len(answers[0]) == 3 and answers[0][0]
    assert len(compiles) == 1  # one step, compiled at the first prompt, for all three


def test_generate_in_bfloat16_loads_the_base_so_and_answers_as_transformers(trained, tiny_causal_lm, capsys):
    """`--dtype bfloat16`: the base in bf16, the adapter kept in float32 (as training keeps it on a half base),
    and the answers transformers' own `generate` gives on that model."""
    import torch

    from deltatune.generation import Generator
    from deltatune.runtime import generate
    from deltatune.runtime.sampling import end_of_sequence_ids

    _, result = trained
    prompt = "Sentiment of: good day"
    generator = Generator(str(tiny_causal_lm), result.saved_to, dtype="bfloat16")
    assert generator.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in generator.model.named_parameters() if "lora_" in n} == {torch.float32}
    (reference,) = generate(
        generator.model, [generator.prompt_ids(prompt)], ["default"], max_new_tokens=12,
        pad_token_id=generator.tokenizer.pad_token_id or 0,
        eos_token_id=end_of_sequence_ids(generator.model, generator.tokenizer), continuous=False,
    )  # fmt: skip
    args = ["generate", "--base", str(tiny_causal_lm), "--adapter", str(result.saved_to), "--jsonl"]
    assert main([*args, "--dtype", "bfloat16", "--max-new-tokens", "12", prompt]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    expected = generator.tokenizer.decode(reference.tokens, skip_special_tokens=True).strip()
    assert json.loads(line)["answer"] == expected and expected


def test_generate_on_an_int8_base_packs_it_in_bfloat16_and_answers_as_the_engine(
    trained, tiny_causal_lm, capsys
):
    """`--quantize int8`: the base's linear layers packed (runtime.weight_only), bf16 activations without
    --dtype, the adapter loaded unmerged on top; the answer is the engine's on that same packed model."""
    import torch

    from deltatune.generation import Generator
    from deltatune.runtime import generate
    from deltatune.runtime.sampling import end_of_sequence_ids
    from deltatune.runtime.weight_only import Int8Linear

    _, result = trained
    prompt = "Sentiment of: good day"
    generator = Generator(str(tiny_causal_lm), result.saved_to, dtype="bfloat16", quantize="int8")
    q_proj = generator.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Int8Linear) and isinstance(generator.model.lm_head, Int8Linear)
    assert (
        q_proj.base_layer.weight.dtype == torch.int8
        and q_proj.lora_A["default"].weight.dtype == torch.float32
    )
    (reference,) = generate(
        generator.model, [generator.prompt_ids(prompt)], ["default"], max_new_tokens=12,
        pad_token_id=generator.tokenizer.pad_token_id or 0,
        eos_token_id=end_of_sequence_ids(generator.model, generator.tokenizer),
    )  # fmt: skip
    args = ["generate", "--base", str(tiny_causal_lm), "--adapter", str(result.saved_to), "--jsonl"]
    assert main([*args, "--quantize", "int8", "--max-new-tokens", "12", prompt]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    expected = generator.tokenizer.decode(reference.tokens, skip_special_tokens=True).strip()
    assert json.loads(line)["answer"] == expected and expected


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    bad = write_config(tmp_path / "bad.yaml", {"model": {"path": "x"}, "training": {"max_steps": 1}})
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "deltatune train: error: invalid training config" in err and "missing required key 'data'" in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["sweep", "--help"], ["serve", "--help"], ["forgetting", "--help"]],
)
def test_help_parses_before_loading_torch(argv):
    """`deltatune --help` answers without importing torch (which takes seconds): the package imports its
    public names lazily and the CLI imports what a command needs only once it runs."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom deltatune.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'optuna', 'fastapi') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "usage: deltatune" in out.stdout
    assert out.stdout.strip().endswith("HEAVY [] CODE 0"), out.stdout[-300:]


def test_public_names_are_the_lazy_table():
    import deltatune

    assert set(deltatune.__all__) == set(deltatune._EXPORTS)
    for name in deltatune.__all__:  # every advertised name resolves
        assert getattr(deltatune, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'LoRAConfigg'"):
        deltatune.LoRAConfigg  # noqa: B018
