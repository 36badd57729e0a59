"""Where a forward keeps only the last positions' logits, the output head gets a contiguous input (torch's
linear is 4-200x slower on the strided view `logits_to_keep` hands it: bench/README §29), and the answers and
losses stay those of the strided head."""

from __future__ import annotations

import pytest
import torch
from conftest import build_llama
from test_runtime import _with_adapters

from deltatune.core.head_input import contiguous_head_input, has_row_major_strides
from deltatune.data.formats import IGNORE
from deltatune.runtime import generate
from deltatune.task.loss import task_loss

PROMPTS = [[5, 9, 14, 3, 8, 21, 7], [11, 4, 6], [30, 2, 19, 25, 40]]


def _head_inputs(model) -> list[tuple[tuple[int, ...], bool]]:
    """Records the (shape, row-major strides) of every input the output head computes on, after its
    pre-hooks."""
    seen: list[tuple[tuple[int, ...], bool]] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append((tuple(args[0].shape), has_row_major_strides(args[0])))
    )
    return seen


def test_a_plain_forward_keeping_one_position_hands_the_head_a_strided_view():
    """The hazard itself, so the tests below can fail: rows > 1 and logits_to_keep=1 slice hidden[:, -1:]."""
    model = build_llama()
    seen = _head_inputs(model)
    model(input_ids=torch.tensor([p[:3] for p in PROMPTS]), logits_to_keep=1)
    model(input_ids=torch.tensor([PROMPTS[0]]), logits_to_keep=1)  # one row: "contiguous", odd strides
    assert seen == [((3, 1, 32), False), ((1, 1, 32), False)]


def test_row_major_strides_count_size_one_dimensions():
    hidden = torch.zeros(2, 5, 8)
    assert has_row_major_strides(hidden) and has_row_major_strides(hidden[:1])
    one_row = torch.zeros(1, 5, 8)[:, -1:]
    assert one_row.is_contiguous() and not has_row_major_strides(one_row)
    assert has_row_major_strides(one_row.clone(memory_format=torch.contiguous_format))
    assert not has_row_major_strides(hidden.transpose(1, 2))


@pytest.mark.parametrize("continuous", [True, False], ids=["engine", "transformers-generate"])
def test_batched_prefill_gives_the_head_contiguous_rows_and_the_same_tokens(continuous):
    model = _with_adapters()
    seen = _head_inputs(model)
    rows = ["a", "a", "a"] if continuous else ["b", "b", "b"]
    done = generate(
        model, PROMPTS, rows, max_new_tokens=4, pad_token_id=0, eos_token_id=None, continuous=continuous,
        share_prefixes=False,
    )  # fmt: skip
    prefills = [row_major for shape, row_major in seen if shape[0] == 3]
    assert prefills and all(prefills)
    assert len(seen) >= 4  # a prefill and three decode steps at least
    seen.clear()
    generate(model, PROMPTS[:1], rows[:1], max_new_tokens=2, pad_token_id=0, eos_token_id=None,
             continuous=continuous)  # fmt: skip
    assert seen and all(row_major for _, row_major in seen)  # one row's prefill too
    with torch.no_grad():
        for prompt, row, completion in zip(PROMPTS, rows, done, strict=True):
            alone = generate(
                model, [prompt], [row], max_new_tokens=4, pad_token_id=0, eos_token_id=None, continuous=False
            )[0]
            assert completion.tokens == alone.tokens


def test_the_loss_on_a_kept_tail_is_unchanged_and_its_head_input_contiguous():
    model = build_llama()
    ids = torch.tensor([[3, 8, 12, 40, 41, 42], [0, 0, 7, 50, 51, 52]])
    labels = ids.clone()
    labels[:, :3] = IGNORE  # the prompt: only the last three positions carry a loss
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    seen = _head_inputs(model)
    with torch.no_grad():
        trimmed, count, _ = task_loss(model, batch, False, fuse_head=False, trim_logits=True)
        full, full_count, _ = task_loss(model, batch, False, fuse_head=False, trim_logits=False)
    assert seen[0][0][1] < ids.shape[1] and seen[0][1]  # the kept tail, contiguous
    assert count == full_count == 6
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)


def test_the_hook_is_gone_after_the_block_even_on_error():
    model = build_llama()
    head = model.get_output_embeddings()
    with pytest.raises(RuntimeError, match="stop"), contiguous_head_input(model):
        assert len(head._forward_pre_hooks) == 1
        raise RuntimeError("stop")
    assert not head._forward_pre_hooks


def test_a_model_without_an_output_head_is_left_alone():
    model = torch.nn.Linear(4, 4)
    with contiguous_head_input(model):
        out = model(torch.ones(2, 4))
    assert out.shape == (2, 4) and not model._forward_pre_hooks
