"""Check the Ascend fast path on your NPU: fused kernels + graph mode + bf16 against the fp32 eager path.

    python tools/ascend_check.py [--device_id 0] [--tokens 32] [--model /models/GLM-4.1V-9B-Thinking]

On a tiny random model (head dims the kernels accept), on the device, with the MindSpore configuration that
``glm4v_ms.set_device("Ascend")`` sets for every user (generate.py, the pipeline, batch jobs:
``glm4v_ms.model.ops.ASCEND_JIT_CONFIG``):
1. reference: fp32, eager (PyNative), fused kernels off: the math verified against transformers on CPU;
2. fast path: bf16, fused kernels on (flash_attention_score TND / causal, fused_infer_attention_score, rms_norm,
   rotary_position_embedding, swiglu), graph-mode prefill and decode;
and reports per stage the relative error of the fast path (vision features, prefill logits, each decode step's
logits) and how many greedy tokens agree. Then the call sites review could not settle without a device:
- GPTQ int4 / int8 layers through ``weight_quant_batch_matmul`` (per-group and per-channel, int4 packing order,
  a layer with a bias in the compute dtype, act-order) against numpy;
- a left-padded batch of 2 through the fused prefill (PyNative and the compiled graph, then decode steps): every
  output finite and each row equal to the row run alone;
- the decoder's rotary call with the shapes of a tensor-parallel rank (one KV head, batch 16, decode and prefill);
- a MoE layer's routed experts (moe_init_routing_v2, grouped_matmul_v4, swiglu, moe_token_unpermute) eagerly and
  in a graph, all experts local and as an expert-parallel rank, against the fp32 eager form;
- with ``--moe`` or a glm4v_moe ``--model`` (GLM-4.5V / GLM-4.6V): a tiny random MoE model (that folder's routing:
  experts, top-k, groups, shared experts) through the whole fast path against fp32 eager: each MoE layer's expert
  choices compared exactly with the near-tie rule of glm4v_ms/apps/router_check.py (a real divergence fails), the
  prompt logits against the fp32 path under the fast path's expert choices, and the compiled prefill / decode
  against the fast path's own forward (``moe_model_errors``).
Finally a device memory-bandwidth microbenchmark and decode tokens/s (of ``--model`` if given, else of the tiny
model). Exits 1 naming every check above its tolerance (bf16 vs fp32: vision features 3e-2, logits 5e-2; weight-quant
matmul, rotary and routed experts 2e-2; non-finite values always fail), 2 without an NPU or for bad arguments.

``--allow_cpu`` runs the same script on CPU in fp32 with the fused kernels off: a dry run of this tool that
verifies nothing about Ascend.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOLERANCE = {"vision.features": 3e-2, "prefill.logits": 5e-2, "decode.logits": 5e-2, "weight_quant": 2e-2,
             "padded": 5e-2, "rotary": 2e-2, "routed_experts": 2e-2, "moe.": 5e-2}
# The routing of the MoE check's tiny model when no glm4v_moe --model gives its own: every MoE path (group-limited
# top-k, 2 shared experts, routed_scaling_factor != 1, a dense first layer).
MOE_ROUTING = {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 2,
               "norm_topk_prob": True, "routed_scaling_factor": 2.5}


def rel(a, b) -> float:
    """Relative error; inf when either side holds a NaN / Inf (a non-finite output always fails)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def aligned_tiny(folder: str, moe=None) -> str:
    """A random model whose head dims are multiples of 16 (vision 64/4, text 64/2), as the FA kernels require.
    ``moe`` (routing fields, e.g. MOE_ROUTING): a GLM-4.5V-style glm4v_moe model instead (3 decoder layers, the
    first dense, head_dim 32), in the Hugging Face per-expert layout."""
    from safetensors.numpy import save_file
    from glm4v_ms.apps.tiny import TINY_45V_TEXT, TINY_TEXT, TINY_VISION, random_weights

    cfg = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "tie_word_embeddings": False,
           "image_token_id": 300, "video_token_id": 301, "image_start_token_id": 302, "image_end_token_id": 303,
           "video_start_token_id": 304, "video_end_token_id": 305,
           "text_config": dict(TINY_TEXT, vocab_size=384, pad_token_id=0, eos_token_id=[1]),
           "vision_config": dict(TINY_VISION, hidden_size=64, num_heads=4)}
    if moe is not None:
        cfg.update(architectures=["Glm4vMoeForConditionalGeneration"], model_type="glm4v_moe")
        cfg["text_config"].update(TINY_45V_TEXT, num_hidden_layers=3, **moe)
        cfg["vision_config"]["model_type"] = "glm4v_moe"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed=0), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def prompt(batch: int = 1, pre: int = 5, post: int = 6):
    rng = np.random.default_rng(0)
    grid = (1, 12, 16)
    row = rng.integers(10, 250, pre).tolist() + [302] + [300] * (12 * 16 // 4) + [303] + \
        rng.integers(10, 250, post).tolist()
    pix = rng.standard_normal((12 * 16, 3 * 2 * 14 * 14)).astype(np.float32)
    return dict(input_ids=np.array([row] * batch), pixel_values=np.concatenate([pix] * batch),
                image_grid_thw=np.array([grid] * batch))


def bandwidth_gb_s(ms, size_mb: int = 1024) -> float:
    """Device read+write bandwidth: a jit-compiled x * s over size_mb of float32, which reads x once and writes the
    result once (2 x size bytes per call); each call timed to ``mindspore.runtime.synchronize()``, best of 10."""
    from mindspore import Tensor, mint

    x = mint.ones((size_mb * 2 ** 20 // 4,), dtype=ms.float32)
    one = Tensor(1.0, ms.float32)
    f = ms.jit(_scale)
    f(x, one)  # compile
    ms.runtime.synchronize()
    best = 1e9
    for _ in range(10):
        t = time.perf_counter()
        y = f(x, one)
        ms.runtime.synchronize()
        best = min(best, time.perf_counter() - t)
        del y
    return 2 * x.nbytes / best / 1e9


def _scale(x, s):
    return x * s


def weight_quant_errors(ms, dtype, fused: bool) -> dict:
    """GPTQ integer weights through quant.QuantLinear (on an NPU: weight_quant_batch_matmul, with int4 packed two per
    byte, element 2j in the low nibble; int8; per-group 128 and per-channel; a layer with a bias, which QuantLinear
    adds after the kernel in the compute dtype; act-order) against x @ ((w + offset) * scale) + bias in fp32 numpy.
    Checks the kernel's argument conventions and dtypes and the int4 packing order glm4v_ms assumes."""
    from mindspore import Tensor
    from glm4v_ms.model import ops
    from glm4v_ms.model.quant import GPTQSpec, QuantLinear, pack_int4_pairs

    rng = np.random.default_rng(2)
    out = {}
    k, n = 512, 256
    ops.set_fused(fused)
    for bits, gs, bias, act in ((4, 128, False, False), (8, 128, False, False), (4, -1, False, False),
                                (4, 128, True, False), (8, 128, True, False), (4, 128, True, True)):
        spec = GPTQSpec(bits=bits, group_size=gs, sym=False, desc_act=act)
        half = 1 << (bits - 1)
        w = rng.integers(-half, half, size=(k, n)).astype(np.int8)
        g = spec.groups(k)
        scale = (rng.random((g, n)) * 0.02 + 0.001).astype(np.float32)
        offset = rng.integers(-2, 3, size=(g, n)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        perm = rng.permutation(k).astype(np.int32)
        x = rng.standard_normal((4, k)).astype(np.float32)
        rows = np.zeros(k, np.int64) if gs == -1 else np.arange(k) // gs
        ref = (x[:, perm] if act else x) @ ((w.astype(np.float32) + offset[rows]) * scale[rows]) + (b if bias else 0)
        layer = QuantLinear(k, n, bias, spec, act, dtype)
        layer.weight.set_data(Tensor(pack_int4_pairs(w) if bits == 4 else w, dtype=layer.weight.dtype))
        layer.scale.set_data(Tensor(scale).astype(dtype))
        layer.offset.set_data(Tensor(offset).astype(dtype))
        if bias:
            layer.bias.set_data(Tensor(b).astype(dtype))
        if act:
            layer.act_perm.set_data(Tensor(perm))
        y = layer(Tensor(x).astype(dtype)).astype(ms.float32).asnumpy()
        name = f"weight_quant int{bits} group {gs}" + (" bias" if bias else "") + (" act-order" if act else "")
        out[name] = rel(y, ref)
    return out


def padded_batch_errors(ms, model, n: int) -> dict:
    """A left-padded batch of 2 (prompts of different lengths, one image each) through the fused prefill: in
    PyNative (every layer's output finite at every position, padding included, since those become the next layer's
    keys and values; each row's logits equal to the row run alone) and as the compiled graph users run (prefill
    logits of each row equal to the row alone; the batch's decode logits finite for n - 1 steps)."""
    from glm4v_ms.runtime.engine import GraphSession, graph_runner
    from glm4v_ms.runtime.generation import GenerationConfig

    rows = [prompt(1, 5, 6), prompt(1, 2, 3)]
    lens = [r["input_ids"].shape[1] for r in rows]
    s = max(lens)
    ids = np.zeros((2, s), np.int64)
    mask = np.zeros((2, s), np.int64)
    for i, r in enumerate(rows):
        ids[i, s - lens[i]:], mask[i, s - lens[i]:] = r["input_ids"][0], 1
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=np.concatenate([r["pixel_values"] for r in rows]),
                 image_grid_thw=np.concatenate([r["image_grid_thw"] for r in rows]))
    f32 = lambda t: t.astype(ms.float32).asnumpy()  # noqa: E731
    out = model(**batch, output_hidden_states=True)
    finite = all(np.isfinite(f32(h)).all() for h in out.hidden_states)
    errors = {"padded.eager hidden states finite": 0.0 if finite else float("inf")}
    logits = f32(out.logits)
    for i, r in enumerate(rows):
        alone = f32(model(**r).logits)[0]
        errors[f"padded.eager row {i} logits"] = rel(logits[i, s - lens[i]:], alone)
    runner = graph_runner(model)

    def graph(inputs, b):
        sess = GraphSession(runner, GenerationConfig(max_new_tokens=n, eos_token_id=[]), b)
        sess.return_logits = True
        cache = runner.open_cache(b, inputs["input_ids"].shape[1], n)
        tok = sess.prefill(inputs, cache)
        got = [sess.last_logits]
        for _ in range(n - 1):
            tok = sess.step(tok, cache)
            got.append(sess.last_logits)
        sess.close(cache)
        return got

    got = graph(batch, 2)
    for i, r in enumerate(rows):
        errors[f"padded.graph row {i} prefill logits"] = rel(got[0][i], graph(r, 1)[0][0])
    errors["padded.graph decode logits finite"] = 0.0 if all(np.isfinite(g).all() for g in got) else float("inf")
    return errors


def rotary_tp_errors(ms, dtype, fused: bool) -> dict:
    """The decoder's rotary call (ops.rotary_qk) with the shapes of a tensor-parallel rank of GLM-4.1V-9B: 16 query
    heads and one KV head of 128, batch 16, a decode step (S = 1) and a prefill (S = 8), against numpy."""
    from mindspore import Tensor
    from glm4v_ms.model import ops

    ops.set_fused(fused)
    rng = np.random.default_rng(3)
    out = {}
    for s in (1, 8):
        q = rng.standard_normal((16, s, 16, 128)).astype(np.float32)
        k = rng.standard_normal((16, s, 1, 128)).astype(np.float32)
        ang = rng.standard_normal((16, s, 64)).astype(np.float32)
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        qd, kd = Tensor(q).astype(dtype), Tensor(k).astype(dtype)
        gq, gk = ops.rotary_qk(qd, kd, Tensor(cos), Tensor(sin))

        def ref(x):
            x = x.astype(ms.float32).asnumpy()
            rot = np.concatenate([-x[..., 64:], x[..., :64]], -1)
            return x * cos[:, :, None] + rot * sin[:, :, None]
        out[f"rotary B16 kv-heads 1 S{s}"] = max(rel(gq.astype(ms.float32).asnumpy(), ref(qd)),
                                                 rel(gk.astype(ms.float32).asnumpy(), ref(kd)))
    return out


def routed_experts_errors(ms, dtype, fused: bool) -> dict:
    """A MoE layer's routed experts (moe_ops.routed_experts; fused: moe_kernels.fused_routed_experts) in PyNative and
    compiled with mindspore.jit, against the fp32 eager form with the fused kernels off: a decode step (1 token) and a
    prefill (37 tokens), top-8 of 16 experts, all local, and as an expert-parallel rank holding experts 8..15 (the
    grouped matmuls then compute only the local rows, and the rows after them must not reach the output)."""
    from mindspore import Tensor
    from glm4v_ms.model import moe_ops, ops

    rng = np.random.default_rng(4)
    h, inner, k, total = 128, 64, 8, 16
    eager_fn, graph_fn = moe_ops.routed_experts, ms.jit(moe_ops.routed_experts)
    out = {}
    for n, start, local in ((1, 0, 16), (37, 0, 16), (37, 8, 8)):
        x = rng.standard_normal((n, h)).astype(np.float32)
        ids = np.stack([rng.permutation(total)[:k] for _ in range(n)]).astype(np.int32)
        w = rng.random((n, k)).astype(np.float32)
        w13 = (rng.standard_normal((local, h, 2 * inner)) / np.sqrt(h)).astype(np.float32)
        w2 = (rng.standard_normal((local, inner, h)) / np.sqrt(inner)).astype(np.float32)
        ops.set_fused(False)
        ref = eager_fn(*(Tensor(a) for a in (x, ids, w, w13, w2)), start, total).asnumpy()
        ops.set_fused(fused)
        args = (Tensor(x).astype(dtype), Tensor(ids), Tensor(w), Tensor(w13).astype(dtype), Tensor(w2).astype(dtype))
        name = f"routed_experts N{n} experts {start}-{start + local - 1} of {total}"
        out[f"{name} eager"] = rel(eager_fn(*args, start, total).astype(ms.float32).asnumpy(), ref)
        with ops.graph_trace():  # off Ascend (the dry run), the static form is traced
            out[f"{name} graph"] = rel(graph_fn(*args, start, total).astype(ms.float32).asnumpy(), ref)
    return out


def fast_path_logits(model, x, n: int, mode: str = "graph"):
    """Greedy decoding of ``n`` tokens through the runtime's session (``graph``: compiled prefill and decode, as users
    run it; ``eager``: PyNative over the KV cache): (logits of each step [1, V], tokens of each step [1])."""
    from glm4v_ms.runtime.generation import GenerationConfig, open_session

    sess, cache = open_session(model, GenerationConfig(max_new_tokens=n, eos_token_id=[]), 1,
                               x["input_ids"].shape[1], mode)
    return _steps(sess, cache, x, n)


def _steps(sess, cache, x, n: int):
    """Prefill ``x`` and decode greedily to ``n`` tokens in ``sess``; (each step's logits, the tokens)."""
    sess.return_logits = True  # GraphSession: read each step's logits back (EagerSession always keeps them)
    tok = sess.prefill(x, cache)
    logits, seq = [sess.last_logits], [tok]
    for _ in range(n - 1):
        tok = sess.step(tok, cache)
        logits.append(sess.last_logits)
        seq.append(tok)
    sess.close(cache)
    return logits, seq


def _force_routing(model, ids_by_layer):
    """Forward hooks that make each MoE layer of ``model`` route to the given experts ([N, K] per layer), with its own
    routing weights for them (sigmoid scores from its own router input and gate, normalised and scaled as its
    router does). Returns the hook handles."""
    import mindspore as ms
    from mindspore import Tensor

    def hook(i):
        def swap(cell, args, output):
            x = args[0].astype(ms.float32).asnumpy().astype(np.float64)
            scores = 1.0 / (1.0 + np.exp(-(x @ cell.weight.astype(ms.float32).asnumpy().astype(np.float64).T)))
            ids = ids_by_layer[i]
            w = np.take_along_axis(scores, ids.astype(np.int64), 1)
            if cell.norm:
                w = w / (w.sum(-1, keepdims=True) + 1e-20)
            return Tensor(ids.astype(np.int32)), Tensor((w * cell.scale).astype(np.float32)), output[2]
        return swap

    return [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(model.language_model.layers)
            if layer.is_moe]


def moe_model_errors(ms, folder: str, x, fast_dtype, n: int, mode: str = "graph", factor: float = 2.0):
    """The MoE model (glm4v_moe) in ``folder``: the fast path (``fast_dtype``, the fused kernels as the caller set
    them, incl. MindSpore's MoE routing / grouped-matmul kernels) against the fp32 eager path, fused kernels off.
    Returns (errors, router reports, greedy tokens agreeing with the fp32 path):

    * router: each MoE layer's expert choices over the prompt (PyNative) compared exactly, near-ties excused by
      glm4v_ms/apps/router_check.py's rule (``dtype`` bf16 rounding of the router weight included); a real
      divergence fails as ``moe.router.layer.K``;
    * ``moe.prefill.logits``: the fast path's prompt logits against the fp32 path's *under the fast path's expert
      choices* (forced by hooks on the fp32 router), so that an excused near-tie flip, which moves a token's MoE
      output by a whole expert, does not hide or fake a kernel error;
    * ``moe.<mode>.prefill.logits`` / ``moe.<mode>.decode.logits``: the runtime's session (``mode``, graph on a
      device) against the fast path's own PyNative forward along its tokens (same dtype, kernels and routing)."""
    from glm4v_ms import load_model
    from glm4v_ms.apps.router_check import compare_router, forward_with_router
    from glm4v_ms.model import ops

    fast_state = dict(ops._FUSED)
    ops.set_fused(False)  # reference: fp32 eager
    ref = load_model(folder, dtype=ms.float32)
    _, ref_router = forward_with_router(ref, x)
    ref_seq = generate_eager(ref, x, n)
    ops._FUSED.update(fast_state)  # the fast path as the caller set it
    fast = load_model(folder, dtype=fast_dtype)
    out, fast_router = forward_with_router(fast, x)
    fast_prompt = out.logits.astype(ms.float32).asnumpy()
    t = ref.config.text
    dtype = "bfloat16" if fast_dtype == ms.bfloat16 else "float32"
    routing = compare_router(fast_router, ref_router, t.n_group, t.topk_group, dtype, factor)
    logits, seq = fast_path_logits(fast, x, n, mode)
    fed = dict(x, input_ids=np.concatenate([x["input_ids"], np.stack(seq[:-1], 1)], 1))
    own = fast(**fed).logits.astype(ms.float32).asnumpy()  # the fast path's PyNative forward along its tokens
    ops.set_fused(False)
    handles = _force_routing(ref, {i: r.ids for i, r in fast_router.items()})
    try:
        forced = ref(**x).logits.asnumpy()
    finally:
        for h in handles:
            h.remove()
    ops._FUSED.update(fast_state)
    s = x["input_ids"].shape[1]
    errors = {"moe.prefill.logits (fp32 path under the fast path's routing)": rel(fast_prompt, forced),
              f"moe.{mode}.prefill.logits": rel(logits[0], own[:, s - 1]),
              f"moe.{mode}.decode.logits": max(rel(logits[k], own[:, s - 1 + k]) for k in range(1, n))}
    agree = int(np.cumprod(np.stack(seq, 1)[0] == ref_seq[0, s:]).sum())
    return errors, routing, agree


def generate_eager(model, x, n: int):
    from glm4v_ms.runtime.generation import generate

    return generate(model, **x, max_new_tokens=n, eos_token_id=[], do_sample=False, mode="eager")


def moe_routing_of(folder: str):
    """The routing fields of a glm4v_moe folder (for the MoE check's tiny model), or None for a dense folder."""
    from glm4v_ms.model.config import Glm4vConfig

    cfg = Glm4vConfig.from_pretrained(folder)
    if not cfg.is_moe:
        return None
    return {k: getattr(cfg.text, k) for k in MOE_ROUTING}


def decode_speed(model, tokens: int) -> float:
    from glm4v_ms.runtime.generation import StepStats, generate

    ids = np.random.default_rng(1).integers(10, 250, size=(1, 64))
    generate(model, ids, max_new_tokens=tokens, eos_token_id=[], do_sample=False)  # compiles
    st = StepStats()
    generate(model, ids, max_new_tokens=tokens, eos_token_id=[], do_sample=False, stats=st)
    return st.decode_tok_s


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device_id", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps compared and timed (at least 2)")
    ap.add_argument("--model", help="a real checkpoint folder to time decode on (bf16, graph mode)")
    ap.add_argument("--allow_cpu", action="store_true", help="dry run on CPU in fp32 (verifies nothing about Ascend)")
    ap.add_argument("--moe", action="store_true",
                    help="also check the MoE model (GLM-4.5V / GLM-4.6V, glm4v_moe) on a tiny random one; implied "
                         "by a glm4v_moe --model, whose routing (experts, top-k, groups) the tiny model then takes")
    ap.add_argument("--router_tie_factor", type=float, default=2.0,
                    help="MoE: safety factor of the expert-choice near-tie tolerance (default 2)")
    args = ap.parse_args(argv)
    if args.tokens < 2:
        return _fail(f"--tokens is {args.tokens}: it must be at least 2 (the prefill and at least one decode step "
                     "are compared)", 2)
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        return _fail(f"--model {args.model}: not a checkpoint folder (no config.json there); give the folder of a "
                     "Hugging Face or converted GLM-V checkpoint", 2)
    if not args.router_tie_factor >= 1:
        return _fail(f"--router_tie_factor {args.router_tie_factor}: must be at least 1", 2)
    moe_routing = dict(MOE_ROUTING) if args.moe else None
    if args.model:
        try:
            moe_routing = moe_routing_of(args.model) or moe_routing
        except (OSError, ValueError) as e:
            return _fail(f"--model {args.model}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}", 2)
    import mindspore as ms
    from glm4v_ms import Glm4vForConditionalGeneration, load_model
    from glm4v_ms.model import ops
    from glm4v_ms.runtime.engine import GraphSession, graph_runner
    from glm4v_ms.runtime.generation import GenerationConfig, generate

    if args.allow_cpu:
        ops.set_device("CPU")
        fast_dtype, fused = ms.float32, False
    else:
        try:  # also applies ops.ASCEND_JIT_CONFIG, exactly as for generate.py, the pipeline and batch jobs
            ops.set_device("Ascend", args.device_id)
        except ValueError as e:
            print(f"ascend_check needs an Ascend NPU with the Ascend build of MindSpore and CANN: {e}",
                  file=sys.stderr)
            return 2
        fast_dtype, fused = ms.bfloat16, True
    tmp = tempfile.mkdtemp(prefix="ascend-check-")
    atexit.register(shutil.rmtree, tmp, True)  # the tiny model is only needed for this run
    folder = aligned_tiny(tmp)
    x = prompt()
    n = args.tokens

    ops.set_fused(False)  # reference: fp32 eager
    ref = Glm4vForConditionalGeneration.from_pretrained(folder, dtype=ms.float32)
    r = ref(**x, output_vision_stages=True)
    ref_feat, ref_logits = r.vision_stages["merger"].asnumpy(), r.logits.asnumpy()[:, -1]
    ref_seq = generate(ref, **x, max_new_tokens=n, eos_token_id=[], do_sample=False, mode="eager")

    ops.set_fused(fused)  # fast path: bf16, fused kernels, graph mode
    fast = Glm4vForConditionalGeneration.from_pretrained(folder, dtype=fast_dtype)
    feat = fast.embed(x["input_ids"], x["pixel_values"], x["image_grid_thw"], return_stages=True)[1]["merger"]
    runner = graph_runner(fast)
    gen = GenerationConfig(max_new_tokens=n, eos_token_id=[])
    fast_logits, seq = _steps(GraphSession(runner, gen, 1), runner.open_cache(1, x["input_ids"].shape[1], n), x, n)
    # the reference's logits along the fast path's own tokens (one uncached fp32 forward)
    ops.set_fused(False)
    fed = np.concatenate([x["input_ids"], np.stack(seq[:-1], 1)], 1)
    full = ref(**dict(x, input_ids=fed)).logits.asnumpy()
    s = x["input_ids"].shape[1]
    errors = {"vision.features": rel(feat.astype(ms.float32).asnumpy(), ref_feat),
              "prefill.logits": rel(fast_logits[0], ref_logits),
              "decode.logits": max(rel(fast_logits[k], full[:, s - 1 + k]) for k in range(1, n))}
    agree = int(np.cumprod(np.stack(seq, 1)[0] == ref_seq[0, s:]).sum())
    errors.update(weight_quant_errors(ms, fast_dtype, fused))
    ops.set_fused(fused)
    errors.update(padded_batch_errors(ms, fast, n))
    errors.update(rotary_tp_errors(ms, fast_dtype, fused))
    errors.update(routed_experts_errors(ms, fast_dtype, fused))
    ops.set_fused(fused)
    routing, moe_agree = [], None
    if moe_routing is not None:
        moe_folder = os.path.join(tmp, "moe")
        os.makedirs(moe_folder)
        aligned_tiny(moe_folder, moe=moe_routing)
        moe_errors, routing, moe_agree = moe_model_errors(ms, moe_folder, x, fast_dtype, n, "graph",
                                                          args.router_tie_factor)
        errors.update(moe_errors)
        ops.set_fused(fused)
    print(f"device: {ops.device_target()}  fast path: {fast_dtype}, fused kernels {'on' if fused else 'off'}, graph; "
          f"jit_config {ms.get_context('jit_config') or '{}'}")
    failed = []
    for k, v in errors.items():
        tol = next(t for prefix, t in TOLERANCE.items() if k.startswith(prefix))
        ok = v <= tol
        if not ok:
            failed.append(k)
        print(f"  {k:<42} rel err {v:.2e}  (tolerance {tol:.0e})  {'ok' if ok else 'FAILED'}")
    print(f"  greedy tokens agreeing before the first difference: {agree}/{n} (bf16 may diverge on near-ties)")
    if moe_routing is not None:
        from glm4v_ms.apps.router_check import describe

        print(f"  MoE ({moe_routing['n_routed_experts']} experts, top {moe_routing['num_experts_per_tok']}, "
              f"{moe_routing['topk_group']} of {moe_routing['n_group']} groups): expert choices of the fast path "
              "against fp32 eager")
        for r in routing:
            if not r["passed"]:
                failed.append(f"moe.router.layer.{r['layer']}")
            print(f"    {describe(r)}  {'ok' if r['passed'] else 'FAILED'}")
        print(f"  MoE greedy tokens agreeing before the first difference: {moe_agree}/{n}")
    print(f"  memory bandwidth (device copy): {bandwidth_gb_s(ms):.1f} GB/s")
    if args.model:
        try:
            speed_model = load_model(args.model, dtype=fast_dtype)  # the class its config.json names
        except Exception as e:  # noqa: BLE001 - any loading problem of the user's folder ends in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: --model {args.model}: cannot be loaded: {first}", file=sys.stderr)
            return 1
    else:
        speed_model = fast
    print(f"  decode ({'--model' if args.model else 'tiny model'}, batch 1, graph): "
          f"{decode_speed(speed_model, n):.1f} tokens/s")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
