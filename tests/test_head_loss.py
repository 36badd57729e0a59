"""The output head and the loss computed together, in chunks (task/head_loss.py): the loss and every gradient
equal the plain `cross_entropy(linear(...))` path's, and models whose logits are not just the head applied to
the hidden states keep the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_llama

import deltatune as dt
from deltatune.data.formats import IGNORE
from deltatune.task import head_loss as hl
from deltatune.task.loss import task_loss


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 rows for a 96-word vocabulary, so a handful of rows spans several, the last one short."""
    monkeypatch.setattr(hl, "CHUNK_BYTES", 5 * 4 * 96)


def head_case(requires_grad: bool = True, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(96, 16, generator=g).requires_grad_(requires_grad)
    b = torch.randn(96, generator=g).requires_grad_(requires_grad) if bias else None
    targets = torch.randint(0, 96, (23,), generator=g)
    return hidden, weight, b, targets


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


def test_loss_and_gradients_equal_the_plain_path_over_several_chunks(small_chunks):
    hidden, weight, bias, targets = head_case()
    reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    fused = hl.linear_cross_entropy(hidden, weight, bias, targets)
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)
    # a scaled loss (the trainer divides by the token count and the accumulation steps) scales every gradient
    for got, want in zip(
        grads_of(fused * 0.37, hidden, weight, bias),
        grads_of(reference * 0.37, hidden, weight, bias),
        strict=True,
    ):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_frozen_head_gets_no_gradient_and_needs_no_bias():
    hidden, weight, _, targets = head_case(requires_grad=False, bias=False)
    fused = hl.linear_cross_entropy(hidden, weight, None, targets)
    reference = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    (got,), (want,) = grads_of(fused, hidden), grads_of(reference, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


def test_without_grad_it_only_scores():
    hidden, weight, bias, targets = head_case()
    with torch.no_grad():
        fused = hl.linear_cross_entropy(hidden, weight, bias, targets)
        reference = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    assert not fused.requires_grad
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-5)


def test_under_bf16_autocast_it_matches_the_plain_path_under_autocast(small_chunks):
    hidden, weight, bias, targets = head_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
        fused = hl.linear_cross_entropy(hidden, weight, bias, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-3)  # the same bf16 products, fp32 softmax
    got, want = grads_of(fused, hidden, weight, bias), grads_of(reference, hidden, weight, bias)
    assert [g.dtype for g in got] == [w.dtype for w in want] == [torch.float32] * 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def labelled_batch(rows: int = 3, width: int = 20) -> dict[str, torch.Tensor]:
    """Right-padded rows with answers starting at different positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row in range(rows):
        length, answer = width - 3 * row, 4 + 2 * row
        mask[row, length:], ids[row, length:] = 0, 0
        labels[row, length - answer : length] = ids[row, length - answer : length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, **options):
    model.zero_grad()
    loss, count, logits = task_loss(model, batch, False, **options)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), count, logits, grads


def assert_same_training_signal(model, batch):
    fused, count, logits, grads = loss_and_grads(model, batch)
    plain, plain_count, plain_logits, plain_grads = loss_and_grads(model, batch, fuse_head=False)
    assert logits is None and plain_logits is not None  # the fused path ran, and kept no logits
    assert count == plain_count == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_task_loss_of_a_lora_model_is_the_plain_paths(small_chunks):
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert_same_training_signal(model.train(), labelled_batch())


def test_a_batch_without_labels_gives_a_zero_loss_that_backpropagates():
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = labelled_batch()
    batch["labels"].fill_(IGNORE)
    loss, count, logits = task_loss(model.train(), batch, False)
    assert (float(loss.detach()), count, logits) == (0.0, 0, None)
    loss.backward()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters() if p.requires_grad)


def test_a_trained_head_gets_the_plain_paths_gradient(small_chunks):
    model = build_llama()
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # what a trainable head (modules_to_save) looks like to the loss
    assert hl.fusable_head(model, labelled_batch()["input_ids"]) is model.lm_head
    assert_same_training_signal(model.train(), labelled_batch())


def test_logits_changed_after_the_head_keep_the_plain_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
    )  # fmt: skip
    model = Gemma2ForCausalLM(config)
    batch = labelled_batch()
    assert hl.fusable_head(model, batch["input_ids"]) is None  # soft-capped: tanh after the head
    model.config.final_logit_softcapping = None
    hl._CHECKED.pop(model)
    assert hl.fusable_head(model, batch["input_ids"]) is model.lm_head


def test_an_adapted_head_or_virtual_tokens_keep_the_plain_path():
    batch = labelled_batch()
    adapted = build_llama()
    dt.inject(adapted, dt.LoraConfig(r=4, target_modules=["lm_head"]))
    assert hl.fusable_head(adapted, batch["input_ids"]) is None
    prompted = build_llama()
    dt.inject(prompted, dt.PromptTuningConfig(num_virtual_tokens=3))
    assert hl.fusable_head(prompted, batch["input_ids"]) is None
    loss, count, logits = task_loss(prompted, batch, False)
    assert logits is not None and count == int((batch["labels"][:, 1:] != IGNORE).sum())


def test_the_check_draws_no_random_numbers_and_keeps_each_modules_mode():
    model = build_llama()
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.5))
    model.train()
    model.model.norm.eval()  # a part the caller keeps in eval mode
    state = torch.get_rng_state()
    assert hl.fusable_head(model, labelled_batch()["input_ids"]) is model.lm_head
    assert torch.equal(torch.get_rng_state(), state)  # a resumed run draws what an unbroken one does
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_the_check_is_kept_per_model_and_head():
    model = build_llama()
    ids = labelled_batch()["input_ids"]
    assert hl.fusable_head(model, ids) is model.lm_head

    def doubled(module, args, output):
        output.logits = output.logits * 2
        return output

    model.register_forward_hook(doubled)  # logits are no longer the head's output
    assert hl.fusable_head(model, ids) is model.lm_head  # the same head: not checked again
    model.lm_head = torch.nn.Linear(32, 96, bias=False)
    assert hl.fusable_head(model, ids) is None  # a new head is checked, and the doubling found
