"""Generation over the static KV cache: token-for-token equality with transformers' greedy generate, the cache
invariant (cached logits == full forward), EOS handling in batches, and the thinking cut-off."""

import numpy as np
import pytest
import torch

from conftest import record
from reference import _text, image_prompt, left_pad, pixels, rel_err, max_abs, video_span
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.model.kv_cache import CacheFullError, KVCache
from glm4v_ms.runtime.engine import graph_runner
from glm4v_ms.runtime.generation import GenerationConfig, StepStats, ThinkingTokens, generate

UNTIED = dict(merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))
NEW = 40  # new tokens per greedy comparison (the issue asks for >= 32)


def _cases():
    rng = np.random.default_rng(100)
    g1 = [(1, 6, 10)]
    g4 = [(1, 4, 4), (1, 6, 4), (1, 2, 8), (1, 8, 8)]
    vg = [(2, 4, 6)]
    gb0, gb1 = [(1, 4, 4)], [(1, 6, 10), (1, 4, 8)]
    ids_b, mask_b = left_pad([image_prompt(rng, gb0, 2, pre=2, post=3), image_prompt(rng, gb1, 2, pre=5, post=2)])
    return {
        "one image": dict(input_ids=np.array([image_prompt(rng, g1, 2)]), pixel_values=pixels(rng, g1),
                          image_grid_thw=np.array(g1)),
        "four images": dict(input_ids=np.array([image_prompt(rng, g4, 2)]), pixel_values=pixels(rng, g4),
                            image_grid_thw=np.array(g4)),
        "video": dict(input_ids=np.array([_text(rng, 3) + video_span(vg[0], 2, [0, 1]) + _text(rng, 4)]),
                      pixel_values_videos=pixels(rng, vg), video_grid_thw=np.array(vg)),
        "left-padded batch of 2": dict(input_ids=ids_b, attention_mask=mask_b, pixel_values=pixels(rng, gb0 + gb1),
                                       image_grid_thw=np.array(gb0 + gb1)),
        "text only": dict(input_ids=np.array([_text(rng, 11)])),
    }


CASES = _cases()


def _hf_generate(ref, inputs, **kw):
    t = {k: torch.tensor(v) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        return ref.generate(**t, do_sample=False, pad_token_id=0, **kw).numpy()


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers(ref_models, case, mode):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    inputs = CASES[case]
    ours = generate(model, **inputs, max_new_tokens=NEW, eos_token_id=[], do_sample=False, mode=mode)
    theirs = _hf_generate(ref, inputs, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None)
    assert ours.shape == theirs.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + NEW)
    diff = np.argwhere(ours != theirs)
    assert len(diff) == 0, f"{case} ({mode}): first differing (row, position) {diff[0].tolist()}"


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_greedy_with_repetition_penalty_equals_transformers(ref_models, mode):
    """The penalty sees the prompt and every fed token (on device in graph mode, updated in place per step)."""
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    inputs = CASES["left-padded batch of 2"]
    ours = generate(model, **inputs, max_new_tokens=NEW, eos_token_id=[], do_sample=False, repetition_penalty=1.5,
                          mode=mode)
    theirs = _hf_generate(ref, inputs, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                          repetition_penalty=1.5)
    plain = generate(model, **inputs, max_new_tokens=NEW, eos_token_id=[], do_sample=False, mode=mode)
    assert (plain != ours).any(), "a penalty of 1.5 should change this greedy output; the test has no teeth"
    diff = np.argwhere(ours != theirs)
    assert len(diff) == 0, f"({mode}) first differing (row, position) {diff[0].tolist()}"


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_eos_stops_rows_and_pads_like_transformers(ref_models, mode):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    inputs = CASES["left-padded batch of 2"]
    s = inputs["input_ids"].shape[1]
    free = generate(model, **inputs, max_new_tokens=24, eos_token_id=[], mode=mode)
    eos = int(free[0, s + 5])  # row 0 emits this at step 5; make it the EOS
    ours = generate(model, **inputs, max_new_tokens=24, eos_token_id=[eos], mode=mode)
    theirs = _hf_generate(ref, inputs, max_new_tokens=24, eos_token_id=eos)
    np.testing.assert_array_equal(ours, theirs)
    assert (ours[0, s + 6:] == 0).all(), "tokens after EOS must be padding"


def test_cached_logits_equal_full_forward(ref_models):
    """At every decode step, the logits computed over the cache equal a full (uncached) forward over the same
    prefix. Tolerance: relative 1e-5 (fp32)."""
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    inputs = dict(CASES["left-padded batch of 2"])
    seq = generate(model, **inputs, max_new_tokens=12, eos_token_id=[], mode="eager")
    b, s = inputs["input_ids"].shape
    cache = KVCache(model.config.text, b, seq.shape[1], model.dtype)
    mask = inputs.pop("attention_mask")
    step_logits = [model(**inputs, attention_mask=mask, cache=cache, logits_to_keep=1).logits.asnumpy()[:, -1]]
    for j in range(s, seq.shape[1] - 1):
        step_logits.append(model(input_ids=seq[:, j:j + 1], cache=cache, logits_to_keep=1).logits.asnumpy()[:, -1])
    full_mask = np.concatenate([mask, np.ones((b, seq.shape[1] - s), np.int64)], 1)
    full = model(**dict(inputs, input_ids=seq[:, :-1]), attention_mask=full_mask[:, :-1]).logits.asnumpy()
    worst = 0.0
    for k, lg in enumerate(step_logits):
        ref = full[:, s - 1 + k]
        worst = max(worst, rel_err(lg, ref))
        assert rel_err(lg, ref) <= 1e-5, f"decode step {k}: cached logits differ from a full forward by " \
            f"{rel_err(lg, ref):.2e} (max abs {max_abs(lg, ref):.2e}); suspect cache positions or the mask"
    record("cache invariant (12 steps)", "logits", worst, 0.0)


class _CountingModel:
    """Wraps the model to record the length of every chunk it is called with."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config, self.dtype = model.config, model.dtype

    def __call__(self, **kw):
        self.calls.append(np.asarray(kw["input_ids"]).shape[1])
        return self.model(**kw)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_thinking_cutoff_injects_once_without_reprefill(ref_models, mode, monkeypatch):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    THINK, END_THINK, ANSWER = 280, 281, 282  # stand-ins for <think>, </think>, <answer> in the tiny vocabulary
    rng = np.random.default_rng(5)
    prompt = np.array([_text(rng, 6) + [THINK]])  # the prompt opens the thinking part
    counting = _CountingModel(model)
    calls = counting.calls
    if mode == "graph":  # count the compiled graphs' calls: prefill chunk = the prompt, decode chunk = 1 token
        counting = model
        runner = graph_runner(model)
        pre, dec = runner.prefill_graph, runner.decode_graph
        monkeypatch.setattr(runner, "prefill_graph", lambda *a: calls.append(prompt.shape[1]) or pre(*a))
        monkeypatch.setattr(runner, "decode_graph", lambda ids, *a: calls.append(ids.shape[1]) or dec(ids, *a))
    stats = StepStats()
    n = 7
    seq = generate(counting, prompt, max_new_tokens=20, eos_token_id=[], max_thinking_tokens=n, stats=stats,
                   thinking=ThinkingTokens(think=THINK, end_think=END_THINK, cutoff=[END_THINK, ANSWER]), mode=mode)
    new = seq[0, prompt.shape[1]:]
    assert new[n].item() == END_THINK and new[n + 1].item() == ANSWER, new.tolist()
    assert (new == END_THINK).sum() == 1 and (new == ANSWER).sum() >= 1
    assert stats.thinking_cut == [n]
    assert calls[0] == prompt.shape[1] and len(calls) == 20 and all(c == 1 for c in calls[1:]), \
        f"the prompt was prefilled again: chunk lengths {calls}"
    # After the injection, the cached continuation is exactly greedy over the full sequence.
    full = model(input_ids=seq[:, :-1]).logits.asnumpy()[0]
    for j in range(prompt.shape[1] + n + 2, seq.shape[1]):
        assert int(np.argmax(full[j - 1])) == seq[0, j], f"continuation after the cut-off differs at {j}"


def test_generation_config_and_cache_errors(ref_models, tmp_path):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, np.array([[5, 6]]), do_sample=True, temperature=0.0, max_new_tokens=2)
    with pytest.raises(TypeError, match="unknown arguments"):
        generate(model, np.array([[5, 6]]), max_new_tokns=2)
    with pytest.raises(CacheFullError, match="max_position_embeddings=4096"):
        generate(model, np.array([[5, 6]]), max_new_tokens=5000)
    cache = KVCache(model.config.text, 1, 3, model.dtype)
    model(input_ids=np.array([[5, 6]]), cache=cache)
    with pytest.raises(CacheFullError, match="holds 3 positions; 2 are used and 2 more"):
        model(input_ids=np.array([[7, 8]]), cache=cache)
    gc = GenerationConfig.from_pretrained(folder, max_new_tokens=3)
    assert gc.max_new_tokens == 3
