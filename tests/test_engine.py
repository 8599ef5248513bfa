"""Graph mode (engine.py): compiled prefill / decode over the static cache with on-device sampling.

Greedy equality with transformers in graph mode is in test_generation.py; here: the cache invariant across decode
buckets, the device sampler against the host pipeline, and reuse of compiled graphs and cache buffers."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from conftest import record
from reference import max_abs, rel_err
from test_generation import CASES, UNTIED
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.runtime import sampling
from glm4v_ms.runtime.engine import GraphSession, graph_runner, next_pow2
from glm4v_ms.runtime.generation import GenerationConfig, generate


def _model(ref_models):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    return Glm4vForConditionalGeneration.from_pretrained(folder)


def test_bucket_arithmetic(ref_models):
    model = _model(ref_models)
    r = graph_runner(model, prefill_bucket=8, min_decode_bucket=16)
    assert [next_pow2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]
    assert r.prefill_len(13) == 16 and r.prefill_len(16) == 16
    assert r.cache_len(13, 10) == 32  # 23 needed -> next power of two
    assert r.decode_bucket(5, 32) == 16 and r.decode_bucket(16, 32) == 32 and r.decode_bucket(40, 32) == 32


def test_graph_logits_equal_full_forward_across_buckets(ref_models):
    """Each compiled step's logits equal an uncached eager forward over the same prefix, through a right-padded
    prefill bucket and a decode-bucket change (small buckets force them). Tolerance: relative 1e-5 (fp32)."""
    model = _model(ref_models)
    runner = graph_runner(model, prefill_bucket=8, min_decode_bucket=16)
    inputs = dict(CASES["left-padded batch of 2"])
    b, s = inputs["input_ids"].shape
    gen = GenerationConfig(max_new_tokens=40, eos_token_id=[])
    sess = GraphSession(runner, gen, b)
    sess.return_logits = True
    cache = runner.open_cache(b, s, gen.max_new_tokens)
    tok = sess.prefill(inputs, cache)
    seq, step_logits = [tok], [sess.last_logits]
    for _ in range(gen.max_new_tokens - 1):
        tok = sess.step(tok, cache)
        seq.append(tok)
        step_logits.append(sess.last_logits)
    assert s % 8 and runner.shapes_seen["prefill"] == {(b, 40)}, runner.shapes_seen  # 38 tokens, padded to 40
    assert {kv for _, kv in runner.shapes_seen["decode"]} == {64, 128}, runner.shapes_seen  # positions 38..77
    ids = np.concatenate([inputs["input_ids"], np.stack(seq[:-1], 1)], 1)
    mask = np.concatenate([inputs["attention_mask"], np.ones((b, len(seq) - 1), np.int64)], 1)
    full = model(**dict(inputs, input_ids=ids, attention_mask=mask)).logits.asnumpy()
    worst = max(rel_err(lg, full[:, s - 1 + k]) for k, lg in enumerate(step_logits))
    worst_abs = max(max_abs(lg, full[:, s - 1 + k]) for k, lg in enumerate(step_logits))
    record("graph decode (40 steps)", "logits", worst, worst_abs)
    assert worst <= 1e-5, f"graph-mode logits differ from a full forward by {worst:.2e}"
    for k, lg in enumerate(step_logits):  # and the device picked the argmax each time
        np.testing.assert_array_equal(seq[k], lg.argmax(-1))


def test_compiled_graphs_and_cache_buffers_are_reused(ref_models):
    model = _model(ref_models)
    runner = graph_runner(model)
    ids = np.array([[5, 6, 7, 8, 9]])
    a = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    (key, pool), = runner._free.items()
    buffers = pool[0]
    seen = {k: set(v) for k, v in runner.shapes_seen.items()}
    b = generate(model, np.array([[5, 6, 7, 8, 9, 10]]), max_new_tokens=5, eos_token_id=[])
    assert runner._free[key][0][0][0] is buffers[0][0], "the second request should reuse the first one's buffers"
    assert runner.shapes_seen == seen, "a request of the same size class compiled new shapes"
    assert a.shape == (1, 11) and b.shape == (1, 11)


def _host_gumbel_choice(logits, seen, u, *, temperature, top_k, top_p, penalty):
    """Gumbel-max over the host pipeline's filtered scores (sampling.py, HF order). The uniforms pair with the
    candidates as on device: in descending score order after top-k or top-p, else in vocabulary order."""
    x = sampling.repetition_penalty(logits, seen, penalty)
    x = sampling.temperature(x, temperature)
    order = np.argsort(-x, axis=-1, kind="stable")
    if top_k == 0 and top_p >= 1:
        order = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    x = sampling.top_p(sampling.top_k(x, top_k), top_p)
    n = u.shape[1]
    cand = order[:, :n]
    scores = np.take_along_axis(x, cand, -1) + (-np.log(-np.log(u)))
    return np.take_along_axis(cand, scores.argmax(-1)[:, None], -1)[:, 0]


@pytest.mark.parametrize("knobs", [dict(temperature=1.0, top_k=2, top_p=1e-5, penalty=1.1),  # official recipe
                                   dict(temperature=0.7, top_k=20, top_p=0.8, penalty=1.3),
                                   dict(temperature=1.3, top_k=0, top_p=0.9, penalty=1.0),
                                   dict(temperature=1.0, top_k=0, top_p=1.0, penalty=1.0)])
def test_device_sampler_equals_host_pipeline(knobs):
    rng = np.random.default_rng(7)
    b, v = 64, 300
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    seen_ids = rng.integers(0, v, size=(b, 12))
    seen = np.zeros((b, v), np.float32)
    np.put_along_axis(seen, seen_ids, 1.0, 1)
    k = knobs["top_k"]
    u = rng.random((b, k or v)).astype(np.float32)
    want = _host_gumbel_choice(logits, seen_ids, u, **knobs)
    got = sampling.device_next_tokens(
        Tensor(logits), Tensor(seen), Tensor(u), Tensor(knobs["temperature"], ms.float32),
        Tensor(knobs["top_p"], ms.float32), Tensor(knobs["penalty"], ms.float32), greedy=False, top_k_=k,
        use_top_p=knobs["top_p"] < 1, use_penalty=knobs["penalty"] != 1).asnumpy()
    np.testing.assert_array_equal(got, want)
    greedy = sampling.device_next_tokens(Tensor(logits), Tensor(seen), Tensor(u), None, None,
                                         Tensor(knobs["penalty"], ms.float32), greedy=True, top_k_=0,
                                         use_top_p=False, use_penalty=knobs["penalty"] != 1).asnumpy()
    host = sampling.next_tokens(logits, seen_ids, do_sample=False, repetition_penalty_=knobs["penalty"])
    np.testing.assert_array_equal(greedy, host)


def test_graph_sampling_is_seeded_and_top1_is_greedy(ref_models):
    model = _model(ref_models)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
    kw = dict(max_new_tokens=16, eos_token_id=[], do_sample=True, top_k=50, top_p=0.95, temperature=1.5)
    a = generate(model, ids, seed=3, **kw)
    b = generate(model, ids, seed=3, **kw)
    c = generate(model, ids, seed=4, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(), "different seeds gave the same 16 sampled tokens"
    top1 = generate(model, ids, max_new_tokens=16, eos_token_id=[], do_sample=True, top_k=1, seed=9)
    greedy = generate(model, ids, max_new_tokens=16, eos_token_id=[], do_sample=False)
    np.testing.assert_array_equal(top1, greedy)
