"""vtprune.compat on the installed transformers release (CI runs this file on the oldest and newest supported).

Each helper reads one thing that moved between releases; these tests drive it with what the installed release
really produces (a real forward, a real generate, real caches), so a rename in a new release fails here first.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, StaticCache

import vtprune
from vtprune import compat
from vtprune.methods.base import PruneConfigError


def _greedy_by_hand(model, inputs, steps: int, cache_name: str) -> list[list[int]]:
    """Greedy decoding with explicit forward calls, the cache passed back under `cache_name`."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = compat.cache_from_output(out)
        assert cache is not None and cache.get_seq_length() > 0
        mask = inputs["attention_mask"]
        position = inputs["position_ids"][:, -1:]
        tokens = []
        for _ in range(steps):
            logits = out.logits[:, -1]
            logits[:, model.config.image_token_id] = float("-inf")
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = position + 1
            out = model(
                input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{cache_name: cache}
            )
            assert compat.cache_from_output(out) is cache
    return torch.cat(tokens, dim=1).tolist()


def _until_eos(model, rows: list[list[int]]) -> list[list[int]]:
    # generate() pads a finished row; the hand-written loop goes on decoding
    eos = model.generation_config.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _cache_names(model) -> list[str]:
    # `cache` is the keyword from 5.24 on; `past_key_values` is accepted by every supported release.
    names = ["past_key_values"]
    if "cache" in inspect.signature(model.forward).parameters:
        names.append("cache")
    return names


@pytest.mark.parametrize(
    "method, params", [("fastv", {}), ("vispruner", {}), ("pdrop", {"layer_list": (1, 2, 3)})]
)
def test_decoding_by_hand_with_either_cache_keyword(tiny, batch_inputs, method, params):
    """The engine finds the cache under the name the caller used: hand-written decoding == generate()."""
    model, _, _ = tiny
    with vtprune.pruned(model, method, keep=16, **params):
        with torch.no_grad():
            expected = model.generate(
                **batch_inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[model.config.image_token_id]
            )[:, -4:].tolist()
        for name in _cache_names(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # 5.24 deprecates `past_key_values`
                by_hand = _greedy_by_hand(model, batch_inputs, 4, name)
            assert _until_eos(model, by_hand) == _until_eos(model, expected), name


def test_cache_from_call_reads_both_names():
    cache = DynamicCache()
    assert compat.cache_from_call({"cache": cache}) is cache
    assert compat.cache_from_call({"past_key_values": cache}) is cache
    assert compat.cache_from_call({"past_key_values": None, "cache": cache}) is cache
    assert compat.cache_from_call({}) is None


def test_static_key_length_and_supported_caches(tiny):
    model, _, _ = tiny
    static = StaticCache(config=model.config, max_cache_len=40)
    dynamic = DynamicCache(config=model.config)
    assert [compat.static_key_length(static, i) for i in range(len(static.layers))] == [40] * len(static.layers)
    assert compat.static_key_length(dynamic, 0) is None
    assert compat.static_key_length(None, 0) is None
    assert compat.static_tokens_held(static, 0) is None  # not filled yet
    kv = torch.zeros(1, model.config.text_config.num_key_value_heads, 3, 8)
    static.update(kv, kv, 0)
    assert int(compat.static_tokens_held(static, 0)) == 3 and compat.static_tokens_held(static, 1) is None
    assert compat.static_tokens_held(dynamic, 0) is None
    assert compat.cache_holds_any_length(static)
    assert compat.cache_holds_any_length(dynamic)
    assert compat.cache_holds_any_length(None)
    dynamic.layers = [DynamicSlidingWindowLayer(sliding_window=8) for _ in dynamic.layers]
    assert not compat.cache_holds_any_length(dynamic)


def test_llm_stage_refuses_a_cache_it_cannot_prune(tiny, batch_inputs):
    """A sliding-window cache keeps a window, not the tokens a pruned layer saw: refused, naming the method and
    the caches that work; a vision-stage method (the LLM just sees a shorter prompt) is not affected."""
    model, _, _ = tiny

    def sliding_cache():
        cache = DynamicCache(config=model.config)
        cache.layers = [DynamicSlidingWindowLayer(sliding_window=4096) for _ in cache.layers]
        return cache

    with vtprune.pruned(model, "fastv", keep=16), pytest.raises(PruneConfigError) as err:
        model(**batch_inputs, **{_cache_names(model)[-1]: sliding_cache()}, use_cache=True)
    message = str(err.value)
    assert "fastv" in message and "dynamic and static" in message and "DynamicCache" in message
    with vtprune.pruned(model, "vispruner", keep=16), torch.no_grad():
        out = model(**batch_inputs, **{_cache_names(model)[-1]: sliding_cache()}, use_cache=True)
    assert out.logits.shape[1] == batch_inputs["input_ids"].shape[1] - 64 + 16


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_padding_mask_of_prebuilt_4d_mask(dtype):
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    length, slots = 5, 9
    causal = torch.tril(torch.ones(length, slots, dtype=torch.bool))
    allowed = causal[None] & torch.nn.functional.pad(valid, (0, slots - length))[:, None, :]
    mask = allowed[:, None]
    if dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    assert torch.equal(compat.padding_mask_of_prebuilt(mask, length), valid)


def test_attention_overrides_are_restored(tiny, batch_inputs):
    model, _, _ = tiny
    before = compat.attention_overrides()
    sdpa_before = compat.attention_function("sdpa")
    with vtprune.pruned(model, "fastv", keep=16):
        assert compat.attention_function("sdpa") is not sdpa_before  # the capturing wrapper
        with torch.no_grad():
            model(**batch_inputs)
    assert compat.attention_overrides() == before
    assert compat.attention_function("sdpa") is sdpa_before


def test_projected_image_features_shape(tiny, batch_inputs):
    model, _, _ = tiny
    cfg = model.config
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=batch_inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
    features = compat.projected_image_features(out)
    assert features.shape == (3, 64, cfg.text_config.hidden_size)
