"""Check the Ascend fast path on your NPU: fused kernels + graph mode + bf16 against the fp32 eager path.

    python tools/ascend_check.py [--device_id 0] [--tokens 32] [--model /models/GLM-4.1V-9B-Thinking]

On a tiny random model (head dims the kernels accept), on the device:
1. reference: fp32, eager (PyNative), fused kernels off: the math verified against transformers on CPU;
2. fast path: bf16, fused kernels on (flash_attention_score TND / causal, fused_infer_attention_score, rms_norm,
   rotary_position_embedding, swiglu), graph-mode prefill and decode;
and reports per stage the relative error of the fast path (vision features, prefill logits, each decode step's
logits) and how many greedy tokens agree; then a device memory-bandwidth microbenchmark and decode tokens/s (of
``--model`` if given, else of the tiny model). Exits 1 if an error is above its tolerance (bf16 vs fp32:
vision features 3e-2, logits 5e-2; GPTQ int4/int8 weights through the weight-quant matmul 2e-2), 2 without an
NPU.

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

TOLERANCE = {"vision.features": 3e-2, "prefill.logits": 5e-2, "decode.logits": 5e-2, "weight_quant": 2e-2}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def aligned_tiny(folder: str) -> str:
    """A random model whose head dims are multiples of 16 (vision 64/4, text 64/2), as the FA kernels require."""
    from safetensors.numpy import save_file
    from glm4v_ms.apps.tiny import TINY_TEXT, TINY_VISION, random_weights

    cfg = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "tie_word_embeddings": False,
           "image_token_id": 300, "video_token_id": 301, "image_start_token_id": 302, "image_end_token_id": 303,
           "video_start_token_id": 304, "video_end_token_id": 305,
           "text_config": dict(TINY_TEXT, vocab_size=384, pad_token_id=0, eos_token_id=[1]),
           "vision_config": dict(TINY_VISION, hidden_size=64, num_heads=4)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed=0), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def prompt(batch: int = 1):
    rng = np.random.default_rng(0)
    grid = (1, 12, 16)
    row = rng.integers(10, 250, 5).tolist() + [302] + [300] * (12 * 16 // 4) + [303] + rng.integers(10, 250, 6).tolist()
    pix = rng.standard_normal((12 * 16, 3 * 2 * 14 * 14)).astype(np.float32)
    return dict(input_ids=np.array([row] * batch), pixel_values=np.concatenate([pix] * batch),
                image_grid_thw=np.array([grid] * batch))


def bandwidth_gb_s(ms, size_mb: int = 1024) -> float:
    """Device read+write bandwidth: a jit-compiled copy (x * 1) of a size_mb tensor, best of 10."""
    from mindspore import Tensor, mint

    x = mint.ones((size_mb * 2 ** 20 // 4,), dtype=ms.float32)
    f = ms.jit(_scale)
    f(x, Tensor(1.0, ms.float32)).asnumpy()[:1]
    best = 1e9
    for _ in range(10):
        t = time.perf_counter()
        f(x, Tensor(1.0, ms.float32)).sum().asnumpy()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best / 1e9


def _scale(x, s):
    return x * s


def weight_quant_errors(ms, dtype, fused: bool) -> dict:
    """GPTQ integer weights through quant.QuantLinear (on an NPU: weight_quant_batch_matmul, with int4 packed two per
    byte, element 2j in the low nibble; int8; per-group 128 and per-channel) against x @ ((w + offset) * scale) in
    fp32 numpy. Checks the kernel's argument conventions and the int4 packing order glm4v_ms assumes."""
    from mindspore import Tensor
    from glm4v_ms.model import ops
    from glm4v_ms.model.quant import GPTQSpec, QuantLinear, pack_int4_pairs

    rng = np.random.default_rng(2)
    out = {}
    k, n = 512, 256
    ops.set_fused(fused)
    for bits, gs in ((4, 128), (8, 128), (4, -1)):
        spec = GPTQSpec(bits=bits, group_size=gs, sym=False, desc_act=False)
        half = 1 << (bits - 1)
        w = rng.integers(-half, half, size=(k, n)).astype(np.int8)
        g = spec.groups(k)
        scale = (rng.random((g, n)) * 0.02 + 0.001).astype(np.float32)
        offset = rng.integers(-2, 3, size=(g, n)).astype(np.float32)
        x = rng.standard_normal((4, k)).astype(np.float32)
        rows = np.zeros(k, np.int64) if gs == -1 else np.arange(k) // gs
        ref = x @ ((w.astype(np.float32) + offset[rows]) * scale[rows])
        layer = QuantLinear(k, n, False, spec, False, dtype)
        layer.weight.set_data(Tensor(pack_int4_pairs(w) if bits == 4 else w, dtype=layer.weight.dtype))
        layer.scale.set_data(Tensor(scale).astype(dtype))
        layer.offset.set_data(Tensor(offset).astype(dtype))
        y = layer(Tensor(x).astype(dtype)).astype(ms.float32).asnumpy()
        out[f"weight_quant int{bits} group {gs}"] = rel(y, ref)
    return out


def decode_speed(model, tokens: int) -> float:
    from glm4v_ms.runtime.generation import StepStats, generate

    ids = np.random.default_rng(1).integers(10, 250, size=(1, 64))
    generate(model, ids, max_new_tokens=tokens, eos_token_id=[], do_sample=False)  # compiles
    st = StepStats()
    generate(model, ids, max_new_tokens=tokens, eos_token_id=[], do_sample=False, stats=st)
    return st.decode_tok_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device_id", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps compared and timed")
    ap.add_argument("--model", help="a real checkpoint folder to time decode on (bf16, graph mode)")
    ap.add_argument("--allow_cpu", action="store_true", help="dry run on CPU in fp32 (verifies nothing about Ascend)")
    args = ap.parse_args(argv)
    import mindspore as ms
    from glm4v_ms import Glm4vForConditionalGeneration
    from glm4v_ms.model import ops
    from glm4v_ms.runtime.engine import GraphSession, graph_runner
    from glm4v_ms.runtime.generation import GenerationConfig, generate

    if args.allow_cpu:
        ops.set_device("CPU")
        fast_dtype, fused = ms.float32, False
    else:
        try:
            ops.set_device("Ascend", args.device_id)
        except ValueError as e:
            print(f"ascend_check needs an Ascend NPU with the Ascend build of MindSpore and CANN: {e}",
                  file=sys.stderr)
            return 2
        fast_dtype, fused = ms.bfloat16, True
        ms.set_context(jit_config={"jit_level": "O0", "infer_boost": "on"})
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
    sess = GraphSession(runner, gen, 1)
    sess.return_logits = True
    cache = runner.open_cache(1, x["input_ids"].shape[1], n)
    tok = sess.prefill(x, cache)
    fast_logits, seq = [sess.last_logits], [tok]
    for _ in range(n - 1):
        tok = sess.step(tok, cache)
        fast_logits.append(sess.last_logits)
        seq.append(tok)
    sess.close(cache)
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
    print(f"device: {ops.device_target()}  fast path: {fast_dtype}, fused kernels {'on' if fused else 'off'}, graph")
    failed = False
    for k, v in errors.items():
        tol = TOLERANCE[k.split(" ")[0]]
        ok = v <= tol
        failed |= not ok
        print(f"  {k:<30} rel err {v:.2e}  (tolerance {tol:.0e})  {'ok' if ok else 'FAILED'}")
    print(f"  greedy tokens agreeing before the first difference: {agree}/{n} (bf16 may diverge on near-ties)")
    print(f"  memory bandwidth (device copy): {bandwidth_gb_s(ms):.1f} GB/s")
    speed_model = Glm4vForConditionalGeneration.from_pretrained(args.model, dtype=fast_dtype) if args.model else fast
    print(f"  decode ({'--model' if args.model else 'tiny model'}, batch 1, graph): "
          f"{decode_speed(speed_model, n):.1f} tokens/s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
