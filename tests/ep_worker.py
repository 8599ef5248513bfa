"""One rank of the expert-parallel test (tests/test_expert_parallel.py), launched by msrun:

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=PORT --join=True \\
          --cluster_time_out=60 --log_dir=LOGS tests/ep_worker.py OUT_DIR TP EP TINY_FOLDER [SYNTHETIC_FOLDER]

First (in a fresh process, before anything else is loaded) the peak memory of loading SYNTHETIC_FOLDER with
``load_tp_model(folder, TP, ep=EP)`` (memory_of_load); then, on the tiny MoE model, the prefill logits of a text
prompt, an image prompt and a left-padded batch of 2, 32 greedy tokens of the batch in eager and in graph mode,
and 8 sampled ones without a seed (graph mode). TINY_FOLDER '-': the memory measurement only.
Everything goes to OUT_DIR/rank<R>.npz; the test compares it with one process. Run without msrun with TP = EP = 1,
it measures the single-process load (the test's reference for the memory ratio).
The inputs and helpers are importable (the test computes its reference with the same functions).
"""

from __future__ import annotations

import gc
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

STEPS = 32  # new greedy tokens per decoding run


def ep_inputs():
    """name -> model inputs: a text prompt, an image prompt, a left-padded batch of two image prompts."""
    from reference import TEXT_HI, image_prompt, left_pad, pixels

    rng = np.random.default_rng(11)
    text = rng.integers(1, TEXT_HI, size=(1, 13)).astype(np.int64)
    grid = [[1, 4, 4]]
    one = np.array([image_prompt(rng, grid, 2, pre=4)], np.int64)
    image = dict(input_ids=one, attention_mask=np.ones_like(one), pixel_values=pixels(rng, grid),
                 image_grid_thw=np.array(grid))
    grids = [[1, 4, 6], [1, 6, 4]]
    ids, mask = left_pad([image_prompt(rng, grids[:1], 2, pre=5), image_prompt(rng, grids[1:], 2, pre=2)])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(rng, grids), image_grid_thw=np.array(grids))
    return {"text": dict(input_ids=text, attention_mask=np.ones_like(text)), "image": image, "batch": batch}


def greedy(model, inputs, mode: str, steps: int = STEPS) -> np.ndarray:
    from glm4v_ms.runtime.generation import generate

    return generate(model, **inputs, max_new_tokens=steps, eos_token_id=[], do_sample=False, mode=mode)


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def memory_of_load(folder: str, tp: int, ep: int):
    """(peak resident growth during load_tp_model in bytes, bytes of the loaded parameters).

    MindSpore's own baseline is taken out: the process group is joined and a tensor is made and set into a parameter
    before measuring (runtime start-up allocations happen first), then the kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs`` = 5), so the peak counts only what the load itself holds at its highest point."""
    import mindspore as ms
    from mindspore import Parameter, Tensor
    from glm4v_ms.model.parallel import init_tensor_parallel
    from glm4v_ms import load_tp_model

    init_tensor_parallel(tp, ep)
    warm = Parameter(Tensor(np.zeros((64, 64), np.float32)), requires_grad=False)
    warm.set_data(Tensor(np.ones((64, 64), np.float32)))
    (warm + 1).asnumpy()
    del warm
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    model, _ = load_tp_model(folder, tp, ms.float32, ep=ep)
    peak = _status_kib("VmHWM")
    held = sum(int(np.prod(p.shape)) * 4 for _, p in model.parameters_and_names())
    del model
    gc.collect()
    return (peak - before) * 1024, held


def main(argv) -> None:
    out_dir, tp, ep, tiny = argv[0], int(argv[1]), int(argv[2]), argv[3]
    synthetic = argv[4] if len(argv) > 4 else None
    import glm4v_ms
    from glm4v_ms import generate, load_tp_model

    glm4v_ms.set_device("CPU")
    res, t0 = {}, time.perf_counter()
    if synthetic:
        res["load_peak_bytes"], res["load_param_bytes"] = (np.array(v) for v in memory_of_load(synthetic, tp, ep))
    if tiny != "-":
        model, ctx = load_tp_model(tiny, tp, ep=ep)
        t = model.config.text
        res["local"] = np.array([t.num_attention_heads, t.num_key_value_heads, t.num_local_experts, t.expert_start])
        for name, inputs in ep_inputs().items():
            res[f"{name}.prefill_logits"] = model(**inputs).logits.asnumpy()
        batch = ep_inputs()["batch"]
        res["eager_tokens"] = greedy(model, batch, "eager")
        res["graph_tokens"] = greedy(model, batch, "graph")
        res["sampled_tokens"] = generate(model, **batch, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=0,
                                         top_p=1.0, temperature=1.0, repetition_penalty=1.0, seed=None, mode="graph")
    else:
        from glm4v_ms.model.parallel import init_tensor_parallel

        ctx = init_tensor_parallel(tp, ep)
    res["ctx"] = np.array([ctx.rank, ctx.world, ctx.tp_rank, ctx.tp_size, ctx.ep_rank, ctx.ep_size])
    res["seconds"] = np.array(time.perf_counter() - t0)
    np.savez(os.path.join(out_dir, f"rank{ctx.rank}.npz"), **res)
    print(f"rank {ctx.rank}: done in {res['seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
