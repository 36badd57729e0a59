"""A half-precision model's decode steps on a CPU attend in float32 over a float32 cache
(runtime.decode_attention): the attention exact against float32 SDPA, more exact than bf16's own kernel, the
model's attention setting put back after each step, and the engine's tokens and scores those of the whole
sequence run through a float64 attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_llama
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from deltatune.runtime.decode import ContinuousBatchingUnsupported, DecodeBatch
from deltatune.runtime.decode_attention import (
    FLOAT32_ATTENTION,
    attending_in_float32,
    decode_kv_dtype,
    float32_attention,
)
from deltatune.runtime.sampling import Sampling


class _Heads(torch.nn.Module):
    """What transformers' sdpa attention reads from the attention module."""

    num_key_value_groups = 3
    is_causal = True


def _decode_shapes(length: int, dtype=torch.bfloat16):
    """One query per row over `length` cached keys (4 rows, 6 query heads sharing 2 key/value heads), the
    first two columns of row 0 padding."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(4, 6, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(4, 2, length, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(4, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :2] = False
    return q, k, v, mask


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_the_attention_is_float32_sdpa_rounded_once(half):
    q, k, v, mask = _decode_shapes(40, half)
    out, _ = float32_attention(_Heads(), q, k.float(), v.float(), mask, scaling=0.25)
    expected, _ = sdpa_attention_forward(_Heads(), q.float(), k.float(), v.float(), mask, scaling=0.25)
    assert out.dtype == half and torch.equal(out, expected.to(half))
    same_dtype, _ = float32_attention(_Heads(), q, k, v, mask, scaling=0.25)  # nothing lifted: plain sdpa
    assert torch.equal(same_dtype, sdpa_attention_forward(_Heads(), q, k, v, mask, scaling=0.25)[0])


@pytest.mark.parametrize("length", [40, 300])
def test_it_is_nearer_the_exact_attention_than_the_bf16_kernel(length):
    """bf16's kernel rounds its probabilities before weighting the values; here only the output is rounded."""
    q, k, v, mask = _decode_shapes(length)
    exact, _ = sdpa_attention_forward(_Heads(), q.double(), k.double(), v.double(), mask, scaling=0.25)
    ours, _ = float32_attention(_Heads(), q, k.float(), v.float(), mask, scaling=0.25)
    kernel, _ = sdpa_attention_forward(_Heads(), q, k, v, mask, scaling=0.25)
    ours_error, kernel_error = ((x.double() - exact).abs().mean().item() for x in (ours, kernel))
    assert ours_error < kernel_error, (ours_error, kernel_error)


def test_which_models_decode_over_a_float32_cache():
    model = build_llama()
    assert model.config._attn_implementation == "sdpa"
    assert decode_kv_dtype(model) is None  # float32: its own dtype
    assert decode_kv_dtype(model.to(torch.bfloat16)) is torch.float32
    assert decode_kv_dtype(model.to(torch.float16)) is torch.float32
    model.config._attn_implementation = "eager"  # another attention is left as it is
    assert decode_kv_dtype(model) is None


def test_a_model_that_computes_sdpa_in_its_own_code_keeps_its_cache_and_decodes():
    """Falcon branches on "sdpa" itself instead of calling transformers' attention interface: switching its
    attention would send it down its eager branch with float32 keys; it keeps its own dtype and decodes."""
    from architectures import ARCHITECTURES

    falcon = next(a for a in ARCHITECTURES if a.name == "falcon").build().to(torch.bfloat16)
    assert falcon.config._attn_implementation == "sdpa" and decode_kv_dtype(falcon) is None
    batch = DecodeBatch(falcon, pad_token_id=0, eos_token_id=None, capacity=2)
    batch.add([[3, 4, 5], [7]], [None, None], max_new_tokens=[4, 4])
    assert {layer.keys.dtype for layer in batch.cache.layers} == {torch.bfloat16}
    while len(batch):
        batch.step()
    assert [len(batch.completion(h).tokens) for h in range(2)] == [4, 4]


def test_the_attention_setting_is_switched_for_the_block_and_put_back():
    from transformers import LlavaConfig

    config = LlavaConfig()
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation_internal = "eager"  # a sub-config with its own setting
    model = torch.nn.Module()
    model.config = config
    with attending_in_float32(model):
        assert config._attn_implementation == config.text_config._attn_implementation == FLOAT32_ATTENTION
    assert config._attn_implementation == config.text_config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "eager"
    with pytest.raises(RuntimeError), attending_in_float32(model):
        raise RuntimeError("a forward failed")
    assert config.text_config._attn_implementation == "sdpa"


def _exact_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    """Attention in float64 on the model's own (half-precision) queries, keys and values, rounded once."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = (t.repeat_interleave(groups, dim=1).double() for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * scaling
    if attention_mask is None:  # (transformers leaves it out where causal order is all there is)
        q_len, k_len = scores.shape[-2:]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], float("-inf"))
    out = F.softmax(scores, dim=-1) @ value
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def test_the_engine_decodes_a_bf16_model_as_an_exact_attention_would():
    """Three rows of different lengths, 6 greedy tokens each: every step's top-3 tokens and their
    log-probabilities are those of the row's whole sequence so far run once through the model with a float64
    attention; the decode cache is float32 and the model's attention setting is sdpa again after each step."""
    model = build_llama().to(torch.bfloat16)
    model.lm_head.weight.data *= (
        40  # a random model's scores are nearly uniform: spread them past bf16's noise
    )
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (5, 9, 2)]
    batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=3)
    batch.add(prompts, [None] * 3, max_new_tokens=[6] * 3, sampling=[Sampling(logprobs=3)] * 3)
    assert {layer.keys.dtype for layer in batch.cache.layers} == {torch.float32}
    while len(batch):
        batch.step()
        assert model.config._attn_implementation == "sdpa"
    done = [batch.completion(handle) for handle in range(3)]

    AttentionInterface.register("test_exact_float64", _exact_attention)
    AttentionMaskInterface.register("test_exact_float64", sdpa_mask)  # (True where a key may be attended)
    model.config._attn_implementation = "test_exact_float64"
    try:
        for prompt, row in zip(prompts, done, strict=True):
            for step, chances in enumerate(row.logprobs[1:], start=1):  # (the first is the prompt pass's)
                ids = torch.tensor([prompt + row.tokens[:step]])
                with torch.no_grad():
                    logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
                expected = torch.log_softmax(logits, -1).topk(3)
                assert [token for token, _ in chances.top] == expected.indices.tolist()
                torch.testing.assert_close(
                    torch.tensor([lp for _, lp in chances.top]), expected.values, atol=0.1, rtol=0
                )
    finally:
        model.config._attn_implementation = "sdpa"


def _causal_architectures():
    from architectures import ARCHITECTURES

    return [a for a in ARCHITECTURES if a.kind in ("causal", "moe")]


@pytest.mark.parametrize("arch", _causal_architectures(), ids=lambda a: a.name)
def test_every_causal_architecture_decodes_in_bf16(arch):
    """The matrix's causal models in bf16 through the engine: those reached through the attention interface
    decode over a float32 cache, the others over their own, and both rows of each get their tokens."""
    model = arch.build().to(torch.bfloat16)
    try:
        batch = DecodeBatch(model, pad_token_id=0, eos_token_id=None, capacity=2)
        batch.add([[3, 4, 5, 6], [7, 8]], [None, None], max_new_tokens=[5, 5])
    except ContinuousBatchingUnsupported:
        pytest.skip("the engine declines this model (the matrix names why)")
    expected = decode_kv_dtype(model) or torch.bfloat16
    assert {layer.keys.dtype for layer in batch.cache.layers} == {expected}
    while len(batch):
        batch.step()
    assert [len(batch.completion(h).tokens) for h in range(2)] == [5, 5]
    assert model.config._attn_implementation in ("sdpa", "eager")
