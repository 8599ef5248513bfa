"""One rank of the tensor-parallel test (tests/test_tensor_parallel.py), launched by msrun:

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=PORT --join=True \\
          --cluster_time_out=60 --log_dir=LOGS tests/tp_worker.py OUT_DIR TP NAME=FOLDER [NAME=FOLDER ...]

For each folder: the eager logits of a full forward over a left-padded batch of two image prompts. For the first
folder also: graph-mode greedy decoding with every step's logits, eager greedy decoding, and graph-mode sampling
without a seed. Everything goes to OUT_DIR/rank<R>.npz; the test compares it with the single-process model.
The inputs and the decoding helpers are importable (the test computes its reference with the same functions).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

STEPS = 8  # new tokens per decoding run


def tp_inputs():
    """A left-padded batch of two image prompts (tiny-model token ids, merge 2)."""
    from reference import image_prompt, left_pad, pixels

    rng = np.random.default_rng(7)
    grids = [[1, 4, 6], [1, 6, 4]]
    a = image_prompt(rng, grids[:1], 2, pre=5)
    b = image_prompt(rng, grids[1:], 2, pre=2)
    ids, mask = left_pad([a, b])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(rng, grids), image_grid_thw=np.array(grids))


def graph_greedy(model, inputs, steps: int = STEPS):
    """Graph-mode greedy decoding with each step's logits: tokens [steps, B], logits [steps, B, V]."""
    from glm4v_ms.runtime.engine import GraphSession, graph_runner
    from glm4v_ms.runtime.generation import GenerationConfig

    runner = graph_runner(model)
    b, s = inputs["input_ids"].shape
    gen = GenerationConfig(max_new_tokens=steps, eos_token_id=[])
    sess = GraphSession(runner, gen, b)
    sess.return_logits = True
    cache = runner.open_cache(b, s, steps)
    try:
        tok = sess.prefill(inputs, cache)
        toks, logits = [tok], [sess.last_logits]
        for _ in range(steps - 1):
            tok = sess.step(tok, cache)
            toks.append(tok)
            logits.append(sess.last_logits)
    finally:
        sess.close(cache)
    return np.stack(toks), np.stack(logits)


def eager_greedy(model, inputs, steps: int = STEPS):
    from glm4v_ms.runtime.generation import generate

    return generate(model, **inputs, max_new_tokens=steps, eos_token_id=[], mode="eager")


def main(argv) -> None:
    out_dir, tp, folders = argv[0], int(argv[1]), [a.split("=", 1) for a in argv[2:]]
    import glm4v_ms
    from glm4v_ms.runtime.generation import generate
    from glm4v_ms import load_tp_model

    glm4v_ms.set_device("CPU")
    inputs = tp_inputs()
    res, t0 = {}, time.perf_counter()
    for i, (name, folder) in enumerate(folders):
        model, ctx = load_tp_model(folder, tp)
        res[f"{name}.prefill_logits"] = model(**inputs).logits.asnumpy()
        res[f"{name}.kv_heads"] = np.array(model.config.text.num_key_value_heads)
        if i == 0:
            res["graph_tokens"], res["graph_logits"] = graph_greedy(model, inputs)
            res["eager_tokens"] = eager_greedy(model, inputs)
            res["sampled_tokens"] = generate(model, **inputs, max_new_tokens=STEPS, eos_token_id=[], do_sample=True,
                                             top_k=0, top_p=1.0, temperature=1.0, repetition_penalty=1.0,
                                             seed=None, mode="graph")
    res["ctx"] = np.array([ctx.rank, ctx.world, ctx.tp_rank, ctx.tp_size, ctx.dp_rank, ctx.dp_size])
    res["seconds"] = np.array(time.perf_counter() - t0)
    np.savez(os.path.join(out_dir, f"rank{ctx.rank}.npz"), **res)
    print(f"rank {ctx.rank}: done in {res['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
