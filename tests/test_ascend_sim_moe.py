"""The Ascend routed-experts path (glm4v_ms/model/moe_kernels.py), verified on CPU with NumPy models of the MoE kernels
(tests/ascend_sim.py): first each model against a plain formula of its documented semantics, then
``fused_routed_experts`` through the models against a plain NumPy reference of the routed-experts spec (fp32 and
bf16), its host-sync freedom, its trace under ``mindspore.jit`` up to kernel selection (where the CPU build stops:
the kernels exist on Ascend only), and the tiny MoE model with the fused path on against its eager path. What this
cannot verify: that the real kernels behave as documented, bf16 numerics on the NPU, and the compiled graph running
(tools/ascend_check.py on a device)."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import ascend_sim
from ascend_sim import KernelDtypeError
from conftest import record
from reference import max_abs, rel_err
from glm4v_ms.model import moe_kernels, ops

TOL = 1e-5
H, INTER = 32, 16


@pytest.fixture
def fp32_models():
    """Call the kernel models directly (float32 stands in for bfloat16, as inside simulated_kernels())."""
    saved = dict(ascend_sim.FP32_STANDS_IN)
    ascend_sim.FP32_STANDS_IN["on"] = True
    yield
    ascend_sim.FP32_STANDS_IN.update(saved)


def _router_ids(rng, n, k, e):
    """Duplicate-free expert choices per token, as a top-k router produces them."""
    return np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)


def _silu(a):
    return a / (1 + np.exp(-a))


# ---------------------------------------------------------------------------------------------------------------
# the kernel models against plain formulas
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["random", "one_expert", "k1"])
def test_init_routing_model_groups_rows_by_expert(fp32_models, case):
    rng = np.random.default_rng(0)
    n, k, e = {"random": (7, 3, 6), "one_expert": (5, 1, 4), "k1": (6, 1, 5)}[case]
    x = rng.standard_normal((n, 8)).astype(np.float32)
    ids = {"random": _router_ids(rng, n, k, e - 1),  # expert e - 1 receives nothing
           "one_expert": np.full((n, k), 2, np.int32),
           "k1": rng.integers(0, e, (n, k)).astype(np.int32)}[case]
    ex, row_idx, counts = ascend_sim.moe_init_routing_v2(Tensor(x), Tensor(ids), 0, 0, e, 0, 2, True)
    ex, row_idx, counts = ex.asnumpy(), row_idx.asnumpy(), counts.asnumpy()
    assert ex.shape == (n * k, 8) and row_idx.shape == (n * k,) and counts.shape == (e,)
    for t in range(n):
        for c in range(k):  # the row of pair (t, c) holds token t
            np.testing.assert_array_equal(ex[row_idx[t * k + c]], x[t])
    src = np.empty_like(row_idx)
    src[row_idx] = np.arange(n * k)  # the pair held by each expanded row
    assert np.all(np.diff(ids.reshape(-1)[src]) >= 0), "expanded rows are not grouped by expert in id order"
    np.testing.assert_array_equal(counts, np.bincount(ids.reshape(-1), minlength=e))
    if case == "random":
        assert counts[e - 1] == 0
    _, _, cum = ascend_sim.moe_init_routing_v2(Tensor(x), Tensor(ids), 0, 0, e, 0, 1, True)
    np.testing.assert_array_equal(cum.asnumpy(), np.cumsum(counts))
    assert len(ascend_sim.moe_init_routing_v2(Tensor(x), Tensor(ids), 0, 0, e, 0, 0, False)) == 2


def test_init_routing_model_refuses_what_the_kernel_refuses(fp32_models):
    x = Tensor(np.zeros((2, 8), np.float32))
    with pytest.raises(AssertionError, match="expert_num - 1"):
        ascend_sim.moe_init_routing_v2(x, Tensor(np.array([[0], [4]], np.int32)), 0, 0, 4, 0, 2, True)
    with pytest.raises(KernelDtypeError, match="int32"):
        ascend_sim.moe_init_routing_v2(x, Tensor(np.array([[0], [1]], np.int64)), 0, 0, 4, 0, 2, True)


def test_grouped_matmul_model(fp32_models):
    rng = np.random.default_rng(1)
    sizes = np.array([3, 0, 5, 1], np.int64)  # expert 1 gets no row
    m = int(sizes.sum())
    x = rng.standard_normal((m, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8, 6)).astype(np.float32)
    want = np.concatenate([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(np.r_[0, np.cumsum(sizes)[:-1]],
                                                                        np.cumsum(sizes)))])

    def gmm(xx, sz, gtype=1, ww=w):
        return ascend_sim.grouped_matmul_v4([Tensor(xx)], [Tensor(ww)], group_list=Tensor(sz), split_item=3,
                                            group_type=0, group_list_type=gtype)[0].asnumpy()

    np.testing.assert_allclose(gmm(x, sizes), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gmm(x, np.cumsum(sizes), 0), want, rtol=1e-5, atol=1e-6)
    one = np.array([0, 0, m, 0], np.int64)  # every row to expert 2
    np.testing.assert_allclose(gmm(x, one), x @ w[2], rtol=1e-5, atol=1e-6)
    part = gmm(x, np.array([3, 0, 2, 0], np.int64))  # groups cover 5 of 9 rows: the rest is undefined (NaN)
    np.testing.assert_allclose(part[:5], want[:5], rtol=1e-5, atol=1e-6)
    assert np.isnan(part[5:]).all()
    with pytest.raises(AssertionError, match="non-negative"):
        gmm(x, np.array([3, -1, 6, 1], np.int64))
    with pytest.raises(AssertionError, match="entries"):
        gmm(x, sizes[:3])
    with pytest.raises(AssertionError, match="sum <= M"):
        gmm(x, sizes + 1)
    with pytest.raises(KernelDtypeError, match="weight"):
        ascend_sim.grouped_matmul_v4([Tensor(x).astype(ms.bfloat16)], [Tensor(w)], group_list=Tensor(sizes),
                                     split_item=3, group_type=0, group_list_type=1)
    with pytest.raises(KernelDtypeError, match="int64"):
        ascend_sim.grouped_matmul_v4([Tensor(x)], [Tensor(w)], group_list=Tensor(sizes.astype(np.int32)),
                                     split_item=3, group_type=0, group_list_type=1)


def test_unpermute_model(fp32_models):
    rng = np.random.default_rng(2)
    n, k = 5, 3
    t = rng.standard_normal((n * k, 8)).astype(np.float32)
    s = rng.permutation(n * k).astype(np.int32)
    p = rng.random((n, k)).astype(np.float32)
    out = ascend_sim.moe_token_unpermute(Tensor(t), Tensor(s), Tensor(p)).asnumpy()
    want = np.stack([sum(p[i, j] * t[s[i * k + j]] for j in range(k)) for i in range(n)])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ascend_sim.moe_token_unpermute(Tensor(t), Tensor(s)).asnumpy(), t[s])  # topK 1
    bad = t.copy()
    bad[s[0]] = np.nan  # a row with probability 0: the documented formula still multiplies it
    p0 = p.copy()
    p0[0, 0] = 0
    assert np.isnan(ascend_sim.moe_token_unpermute(Tensor(bad), Tensor(s), Tensor(p0)).asnumpy()[0]).all()
    with pytest.raises(AssertionError, match="permutation"):
        ascend_sim.moe_token_unpermute(Tensor(t), Tensor(np.zeros(n * k, np.int32)), Tensor(p))
    with pytest.raises(KernelDtypeError, match="int32"):
        ascend_sim.moe_token_unpermute(Tensor(t), Tensor(s.astype(np.int64)), Tensor(p))


def test_routing_then_unpermute_restores_tokens(fp32_models):
    """The two kernels' index conventions fit: unpermuting the routed rows with weights p gives sum_k p[n, k] x[n]."""
    rng = np.random.default_rng(3)
    n, k, e = 9, 4, 8
    x = rng.standard_normal((n, 8)).astype(np.float32)
    ids = _router_ids(rng, n, k, e)
    p = rng.random((n, k)).astype(np.float32)
    ex, row_idx, _ = ascend_sim.moe_init_routing_v2(Tensor(x), Tensor(ids), 0, 0, e, 0, 2, True)
    out = ascend_sim.moe_token_unpermute(ex, row_idx, Tensor(p)).asnumpy()
    np.testing.assert_allclose(out, x * p.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# fused_routed_experts through the models against the plain definition
# ---------------------------------------------------------------------------------------------------------------

def eager_routed_experts_reference(x, topk_ids, topk_weights, w13, w2, expert_start=0, bf16=False):
    """The routed-experts spec in NumPy, in transformers 4.57's order: a loop over the local experts, each computing
    its tokens' (silu(x Wg) * (x Wu)) W2, weighted and summed in float32 (index_add), cast at the end. ``bf16``:
    the inputs are bf16 values and every op output a bf16 model stores is rounded to bf16 (the linear layers, silu,
    the product, the final cast), products and sums in fp32."""
    import ml_dtypes

    def r(a):
        return a.astype(ml_dtypes.bfloat16).astype(np.float32) if bf16 else a

    local, inter = w13.shape[0], w2.shape[1]
    out = np.zeros(x.shape, np.float32)
    for e in range(local):
        rows, cols = np.nonzero(topk_ids == expert_start + e)
        if rows.size == 0:
            continue
        h = x[rows]
        gate, up = r(h @ w13[e][:, :inter]), r(h @ w13[e][:, inter:])
        y = r(r(r(_silu(gate)) * up) @ w2[e])
        np.add.at(out, rows, y * topk_weights[rows, cols][:, None])
    return r(out)


def _problem(n, k, e_total, seed, bf16=False):
    """x, router ids/weights and all E_total experts' weights (w13 [E, H, 2I], w2 [E, I, H])."""
    import ml_dtypes
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, H)).astype(np.float32)
    ids = _router_ids(rng, n, k, e_total)
    scores = 1 / (1 + np.exp(-rng.standard_normal((n, k))))
    weights = (2.5 * scores / scores.sum(1, keepdims=True)).astype(np.float32)  # normalised, routed scaling 2.5
    w13 = (rng.standard_normal((e_total, H, 2 * INTER)) / np.sqrt(H)).astype(np.float32)
    w2 = (rng.standard_normal((e_total, INTER, H)) / np.sqrt(INTER)).astype(np.float32)
    if bf16:  # bf16 values, held in fp32 arrays
        x, w13, w2 = (a.astype(ml_dtypes.bfloat16).astype(np.float32) for a in (x, w13, w2))
    return x, ids, weights, w13, w2


def _fused(x, ids, weights, w13, w2, start, e_total, dtype=ms.float32, ids_dtype=np.int32):
    t = [Tensor(a).astype(dtype) for a in (x, w13, w2)]
    out = moe_kernels.fused_routed_experts(t[0], Tensor(ids.astype(ids_dtype)), Tensor(weights), t[1], t[2],
                                           start, e_total)
    assert out.dtype == dtype and out.shape == x.shape
    return out.astype(ms.float32).asnumpy()


# (N, K, E_total, L, expert_start): decode and prefill, top-2 and top-8, all experts local or half of them (EP rank 1
# holds experts 8..15, rank 0 holds 0..7)
CASES = [(1, 8, 16, 16, 0), (37, 8, 16, 16, 0), (1, 2, 16, 16, 0), (37, 2, 16, 16, 0),
         (1, 8, 16, 8, 8), (37, 8, 16, 8, 8), (1, 2, 16, 8, 8), (37, 2, 16, 8, 8), (37, 8, 16, 8, 0)]


@pytest.mark.parametrize("n,k,e_total,local,start", CASES)
def test_fused_routed_experts_equals_reference(n, k, e_total, local, start):
    x, ids, weights, w13, w2 = _problem(n, k, e_total, seed=n * 100 + k)
    w13l, w2l = w13[start:start + local], w2[start:start + local]
    want = eager_routed_experts_reference(x, ids, weights, w13l, w2l, start)
    with ascend_sim.simulated_kernels() as calls:
        got = _fused(x, ids, weights, w13l, w2l, start, e_total, ids_dtype=np.int64 if n == 37 else np.int32)
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    assert [c["kernel"] for c in calls] == ["moe_init_routing_v2", "grouped_matmul_v4", "swiglu",
                                            "grouped_matmul_v4", "moe_token_unpermute"]
    local_pairs = int(((ids >= start) & (ids < start + local)).sum())
    assert calls[0]["expert_num"] == e_total and calls[0]["x"] == (n, H)
    assert calls[1]["w"] == (local, H, 2 * INTER) and calls[3]["w"] == (local, INTER, H)
    assert calls[1]["rows"] == calls[3]["rows"] == local_pairs  # only the local experts' rows are computed
    assert calls[4]["probs_dtype"] == ms.float32
    if local < e_total and n == 37 and k == 2:  # the path where a token has no local expert at all is reached
        none_local = ~((ids >= start) & (ids < start + local)).any(1)
        assert none_local.any() and np.all(got[none_local] == 0)


def test_expert_parallel_ranks_sum_to_the_whole():
    """Two EP ranks' partial outputs (experts 0..7 and 8..15) add up to the single-rank output (what the caller's
    all-reduce produces)."""
    x, ids, weights, w13, w2 = _problem(37, 8, 16, seed=5)
    with ascend_sim.simulated_kernels():
        whole = _fused(x, ids, weights, w13, w2, 0, 16)
        parts = [_fused(x, ids, weights, w13[s:s + 8], w2[s:s + 8], s, 16) for s in (0, 8)]
    assert rel_err(parts[0] + parts[1], whole) <= TOL


def test_every_token_to_one_expert_k1():
    x, _, weights, w13, w2 = _problem(12, 1, 16, seed=6)
    ids = np.full((12, 1), 11, np.int32)
    want = eager_routed_experts_reference(x, ids, weights, w13, w2)
    with ascend_sim.simulated_kernels():
        assert rel_err(_fused(x, ids, weights, w13, w2, 0, 16), want) <= TOL
        np.testing.assert_allclose(_fused(x, ids, weights, w13[8:], w2[8:], 8, 16), want, rtol=1e-5, atol=1e-6)
        assert np.all(_fused(x, ids, weights, w13[:8], w2[:8], 0, 16) == 0)  # the one expert is on the other rank


def test_bf16_through_the_models_is_bounded():
    """bf16 inputs with only the documented dtypes (simulated_kernels(fp32=False)). The kernels round less often than
    transformers' bf16 order (fused matmul outputs, one swiglu rounding, fp32 products with the fp32 weights), so the
    error against the fp32 definition must be of the size of transformers' own bf16 error. All experts are local
    here: the EP row mask is a select on bf16, which MindSpore 2.10 has no CPU kernel for (the mask is covered in
    fp32 above; on Ascend the select takes bf16)."""
    x, ids, weights, w13, w2 = _problem(37, 8, 16, seed=7, bf16=True)
    exact = eager_routed_experts_reference(x, ids, weights, w13, w2)
    hf_bf16 = eager_routed_experts_reference(x, ids, weights, w13, w2, bf16=True)
    with ascend_sim.simulated_kernels(fp32=False) as calls:
        got = _fused(x, ids, weights, w13, w2, 0, 16, dtype=ms.bfloat16)
    assert [c.get("dtype") for c in calls] == [ms.bfloat16, ms.bfloat16, None, ms.bfloat16, ms.bfloat16]  # swiglu: none
    assert calls[4]["probs_dtype"] == ms.float32
    err, err_hf = rel_err(got, exact), rel_err(hf_bf16, exact)
    print(f"bf16 relative error: kernels {err:.2e}, transformers' order {err_hf:.2e}")
    assert err <= max(1.5 * err_hf, 2 ** -8), (err, err_hf)


def test_no_host_sync(monkeypatch):
    """fused_routed_experts reads no tensor back to the host (every shape is static): outside the kernel models,
    which are NumPy and must read their inputs, any conversion of a tensor to host values raises."""
    inside = {"depth": 0}

    def host_read(name, orig):
        def guarded(self, *a, **kw):
            if inside["depth"] == 0:
                raise AssertionError(f"host read Tensor.{name} outside a kernel model")
            return orig(self, *a, **kw)
        return guarded

    def in_kernel(f):
        def run(*a, **kw):
            inside["depth"] += 1
            try:
                return f(*a, **kw)
            finally:
                inside["depth"] -= 1
        return run

    x, ids, weights, w13, w2 = _problem(37, 8, 16, seed=8)
    args = [Tensor(x), Tensor(ids), Tensor(weights), Tensor(w13[8:]), Tensor(w2[8:])]  # EP: the mask path too
    with ascend_sim.simulated_kernels():
        for name in ascend_sim.SIMS:  # simulated_kernels() puts the real kernels back on exit
            setattr(ops.KERNELS, name, in_kernel(getattr(ops.KERNELS, name)))
        try:
            for name in ("asnumpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                if hasattr(Tensor, name):
                    monkeypatch.setattr(Tensor, name, host_read(name, getattr(Tensor, name)))
            with pytest.raises(AssertionError, match="host read"):
                args[0].asnumpy()  # the guard is live
            out = moe_kernels.fused_routed_experts(*args, 8, 16)
        finally:
            monkeypatch.undo()
    want = eager_routed_experts_reference(x, ids, weights, w13[8:], w2[8:], 8)
    assert rel_err(out.asnumpy(), want) <= TOL


@ms.jit
def _jit_routed(x, ids, weights, w13, w2):
    return moe_kernels.fused_routed_experts(x, ids, weights, w13, w2, 8, 16)


@ms.jit
def _jit_routed_all_local(x, ids, weights, w13, w2):
    return moe_kernels.fused_routed_experts(x, ids, weights, w13, w2, 0, 16)


@pytest.mark.parametrize("fn,local", [(_jit_routed, 8), (_jit_routed_all_local, 16)])
def test_traces_into_jit_up_to_kernel_selection(fn, local, tmp_path, monkeypatch):
    """Under mindspore.jit on CPU with the real kernels: MindSpore parses the function and infers every op's type and
    shape (the MoE kernels' own InferShape/InferType included: bf16 tokens with fp32 probs, int32 indices, the
    functional moe_init_routing_v2's three outputs) before any kernel is selected; compilation then stops at the
    first Ascend-only kernel. A dtype or shape MindSpore's inference refuses, or a wrong number of outputs (the
    functional moe_init_routing_v2 returns three here, not the primitive's four), fails earlier with another error.
    (Graph mode turns int(tensor) into a graph op, so host reads are test_no_host_sync's concern.)"""
    monkeypatch.chdir(tmp_path)  # a failed compile may write rank_0/ into the working directory
    assert ops.KERNELS.moe_init_routing_v2 is ms.ops.moe_init_routing_v2, "the real kernels must be in place"
    x, ids, weights, w13, w2 = _problem(5, 8, 16, seed=9)
    args = [Tensor(x).astype(ms.bfloat16), Tensor(ids), Tensor(weights), Tensor(w13[:local]).astype(ms.bfloat16),
            Tensor(w2[:local]).astype(ms.bfloat16)]
    with pytest.raises(RuntimeError) as err:
        fn(*args)
    msg = str(err.value)
    assert "Kernel select failed" in msg and "MoeInitRoutingV2" in msg, msg[:2000]


def test_layout_errors_name_the_input():
    x, ids, weights, w13, w2 = _problem(3, 2, 16, seed=10)
    t = [Tensor(a) for a in (x, ids, weights, w13, w2)]
    with pytest.raises(ValueError, match="w2"):
        moe_kernels.fused_routed_experts(t[0], t[1], t[2], t[3], Tensor(w2[:, :, :8]), 0, 16)
    with pytest.raises(ValueError, match="expert_start"):
        moe_kernels.fused_routed_experts(t[0], t[1], t[2], Tensor(w13[:8]), Tensor(w2[:8]), 12, 16)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_kernels.fused_routed_experts(t[0], t[1], Tensor(weights[:, :1]), t[3], t[4], 0, 16)


# ---------------------------------------------------------------------------------------------------------------
# the MoE model (glm4v_moe) with the fused path on, through the kernel models, against its eager path
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """The tiny GLM-4.5V-style model of tests/test_moe_parity.py (a dense first layer, then 2 MoE layers of 16
    experts, top-4, group-limited routing, 2 shared experts), head_dim 32 (the attention kernels want multiples of
    16). Its vision tower (head dim 12) is not run here: tests/test_ascend_sim.py covers the tower's fused path."""
    from reference import build_moe_reference
    from glm4v_ms import load_model

    folder = str(tmp_path_factory.mktemp("moe_fused"))
    build_moe_reference(folder, seed=3)
    return load_model(folder)


def _padded_text(seed):
    from reference import _text, left_pad

    rng = np.random.default_rng(seed)
    return left_pad([_text(rng, 7), _text(rng, 13)])


def test_moe_model_fused_path_equals_eager(moe_model):
    """Prefill of a left-padded batch: every MoE layer's routed experts go through the four kernels (the attention,
    norms and rotary through theirs) and the logits equal the eager path's."""
    ids, mask = _padded_text(11)
    eager = moe_model(input_ids=ids, attention_mask=mask).logits.asnumpy()
    with ascend_sim.simulated_kernels() as calls:
        fused = moe_model(input_ids=ids, attention_mask=mask).logits.asnumpy()
    text = moe_model.config.text
    moe_layers = text.num_hidden_layers - text.first_k_dense_replace
    assert sum(c["kernel"] == "moe_token_unpermute" for c in calls) == moe_layers > 0
    assert all(c["x"] == (ids.size, text.hidden_size) for c in calls if c["kernel"] == "moe_init_routing_v2")
    rows = mask.astype(bool)
    rel = rel_err(fused[rows], eager[rows])
    record("fused sim: MoE padded text", "logits", rel, max_abs(fused[rows], eager[rows]))
    assert rel <= TOL, rel


def test_moe_model_fused_greedy_decode_equals_eager(moe_model):
    """12 greedy tokens of a left-padded batch: prefill and every decode step (N = 2 tokens, top-4 of 16 experts)
    through the kernel models give the eager path's tokens."""
    from glm4v_ms import generate

    ids, mask = _padded_text(12)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], do_sample=False, mode="eager")
    want = generate(moe_model, **kw)
    with ascend_sim.simulated_kernels() as calls:
        got = generate(moe_model, **kw)
    np.testing.assert_array_equal(got, want)
    text = moe_model.config.text
    steps = [c["x"][0] for c in calls if c["kernel"] == "moe_init_routing_v2"]
    assert len(steps) == 12 * (text.num_hidden_layers - text.first_k_dense_replace)
    assert steps.count(ids.shape[0]) == 11 * (text.num_hidden_layers - text.first_k_dense_replace)  # decode steps
