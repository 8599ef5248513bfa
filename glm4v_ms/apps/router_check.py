"""Expert choices of two runs of a GLM-4.5V / GLM-4.6V router compared exactly, with a near-tie rule.

Used by tools/parity.py (glm4v_ms against transformers) and tools/ascend_check.py (the bf16 fused path against
the fp32 eager path). Per MoE layer, each side gives its router input ``x`` [N, H] (the post-attention-norm hidden
states the gate reads; N = batch x tokens) and its chosen experts ``ids`` [N, K]. The sets of chosen experts must
be equal token by token. A token whose choice differs is excused (a *near-tie*) only when rounding of the router's
inputs can explain it, judged in OUR choice scores ``c = sigmoid(x W^T) + e_score_correction_bias``:

* the tolerance of expert e at token n is what the measured error of the router input can move its score by:
  ``t[n, e] = factor * (0.25 * (|w_e . (x_ours[n] - x_ref[n])| + (u + 2 H 2^-24) sum_i |w_e,i x_ours[n, i]|)
  + 2^-22)``. 0.25 is the largest slope of the sigmoid; ``u`` the rounding of the router weight to our dtype
  (0 in fp32, 2^-8 for bf16: twice bf16's unit roundoff); ``2 H 2^-24`` the worst-case fp32 rounding of the
  two H-term dot products (Higham's gamma_H, once per side); 2^-22 the sigmoid's own rounding; ``factor`` (default
  2) a safety factor. W is the reference's gate weight. A wrong router weight or a wrong top-k on our side is
  *not* covered by it: only the measured input error and rounding are.
* experts: for every expert a we chose and the reference did not, and every b it chose and we did not (both in
  groups kept by both sides), our scores must satisfy ``c[a] - c[b] <= t[a] + t[b]``: the k-th and (k+1)-th
  choices swapped within the error.
* groups (``n_group`` > 1 with ``topk_group`` < ``n_group``): when the kept groups differ, our group scores (the sum
  of each group's top 2 choice scores) must satisfy ``g[a] - g[b] <= T[a] + T[b]`` for every group a only we kept and
  b only the reference kept, T[g] being the sum of the two largest t in group g; the experts of such a flipped
  group then follow from the group choice and are not compared one by one.

Anything else is a real divergence and fails. Our choice scores of experts in groups our router dropped are zeroed
in the model's output; they are recomputed here from our router input and weights (fp64) so that group scores can
be compared. ``forward_with_router`` runs a glm4v_ms MoE model and collects its side; the comparison is numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

DEFAULT_FACTOR = 2.0
FP32_EPS = 2.0 ** -24
DTYPE_ROUNDING = {"float32": 0.0, "bfloat16": 2.0 ** -8}


@dataclass
class RouterLayer:
    """One side's router at one MoE layer: input x [N, H], chosen experts ids [N, K]; gate weight [E, H] and
    e_score_correction_bias [E] (our side: to recompute dropped groups' scores; the reference's: the tolerance);
    ``choice`` [N, E] the model's own choice scores (dropped groups zeroed) when it reports them."""
    x: np.ndarray
    ids: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    choice: Optional[np.ndarray] = None


def forward_with_router(model, inputs: Dict, **kwargs):
    """``model(**inputs, output_router_choices=True, **kwargs)`` of a glm4v_ms MoE model (PyNative), also returning
    {decoder layer: RouterLayer} of every MoE layer: the router input (captured by a forward pre-hook on the gate,
    removed before returning), the chosen experts and choice scores, the gate weight and bias (fp32)."""
    import mindspore as ms

    gates = [(i, layer.mlp.gate) for i, layer in enumerate(model.language_model.layers) if layer.is_moe]
    seen: Dict[int, np.ndarray] = {}

    def pre_hook(i):
        def hook(cell, args):
            seen[i] = args[0].astype(ms.float32).asnumpy()
        return hook

    handles = [gate.register_forward_pre_hook(pre_hook(i)) for i, gate in gates]
    try:
        out = model(**inputs, output_router_choices=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    router = {}
    for (i, gate), (ids, choice) in zip(gates, out.router_choices):
        router[i] = RouterLayer(x=seen[i], ids=ids, choice=choice, weight=gate.weight.astype(ms.float32).asnumpy(),
                                bias=gate.e_score_correction_bias.astype(ms.float32).asnumpy())
    return out, router


def choice_scores(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """sigmoid(x W^T) + bias in fp64, before any group masking: [N, E]."""
    logits = np.asarray(x, np.float64) @ np.asarray(weight, np.float64).T
    return 1.0 / (1.0 + np.exp(-logits)) + np.asarray(bias, np.float64)[None]


def group_scores(c: np.ndarray, n_group: int) -> np.ndarray:
    """[N, E] -> [N, G]: the sum of each group's two largest entries (transformers' group score)."""
    n, e = c.shape
    top2 = np.sort(c.reshape(n, n_group, e // n_group), axis=-1)[..., -2:]
    return top2.sum(-1)


def kept_groups(c: np.ndarray, n_group: int, topk_group: int) -> np.ndarray:
    """[N, G] bool: the topk_group groups with the best group scores."""
    gs = group_scores(c, n_group)
    best = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_group]
    keep = np.zeros(gs.shape, bool)
    np.put_along_axis(keep, best, True, axis=-1)
    return keep


def tolerances(ours: RouterLayer, ref: RouterLayer, dtype: str = "float32",
               factor: float = DEFAULT_FACTOR) -> np.ndarray:
    """t [N, E] of the module docstring."""
    w = np.asarray(ref.weight, np.float64)
    xo = np.asarray(ours.x, np.float64)
    dx = xo - np.asarray(ref.x, np.float64)
    u = DTYPE_ROUNDING.get(dtype, 2.0 ** -8) + 2 * w.shape[1] * FP32_EPS
    return factor * (0.25 * (np.abs(dx @ w.T) + u * (np.abs(xo) @ np.abs(w).T)) + 2.0 ** -22)


def compare_layer(layer: int, ours: RouterLayer, ref: RouterLayer, n_group: int, topk_group: int,
                  dtype: str = "float32", factor: float = DEFAULT_FACTOR) -> Dict:
    """The report of one MoE layer: tokens, choices compared, differing choices (ours not in the reference's set),
    excused near-ties and real divergences (choices), the router input's max abs error, and the first real
    divergence (token, experts of each side, the gap and its tolerance)."""
    n, k = ours.ids.shape
    if ref.ids.shape != (n, k) or ours.x.shape != ref.x.shape:
        raise ValueError(f"router layer {layer}: our choices {ours.ids.shape} / inputs {ours.x.shape} do not match "
                         f"the reference's {ref.ids.shape} / {ref.x.shape}")
    e = ref.weight.shape[0]
    per = e // n_group
    c = choice_scores(ours.x, ours.weight, ours.bias)
    if ours.choice is not None:  # the model's own scores where its router kept the group
        own = np.asarray(ours.choice, np.float64)
        c = np.where(own != 0, own, c)
    grouped = topk_group < n_group
    if grouped:
        if ours.choice is not None:
            keep_o = (np.asarray(ours.choice).reshape(n, n_group, per) != 0).any(-1)
        else:
            keep_o = kept_groups(c, n_group, topk_group)
        keep_r = kept_groups(choice_scores(ref.x, ref.weight, ref.bias), n_group, topk_group)
    t = tolerances(ours, ref, dtype, factor)
    differing = excused = real = 0
    first = None
    for i in range(n):
        so, sr = set(ours.ids[i].tolist()), set(ref.ids[i].tolist())
        if so == sr:
            continue
        d = len(so - sr)
        differing += d
        why = None
        common = None
        if grouped and (keep_o[i] != keep_r[i]).any():
            gs = group_scores(c[i:i + 1], n_group)[0]
            tg = np.sort(t[i].reshape(n_group, per), -1)[:, -2:].sum(-1)
            for a in np.flatnonzero(keep_o[i] & ~keep_r[i]):
                for b in np.flatnonzero(keep_r[i] & ~keep_o[i]):
                    gap, tol = gs[a] - gs[b], tg[a] + tg[b]
                    if gap > tol and why is None:
                        why = dict(kind="group", ours_only=int(a), reference_only=int(b), gap=float(gap),
                                   tolerance=float(tol))
        if grouped:
            common = keep_o[i] & keep_r[i]
        if why is None:
            for a in sorted(so - sr):
                for b in sorted(sr - so):
                    if common is not None and not (common[a // per] and common[b // per]):
                        continue  # follows from a group flip judged above
                    gap, tol = c[i, a] - c[i, b], t[i, a] + t[i, b]
                    if gap > tol and why is None:
                        why = dict(kind="expert", ours_only=int(a), reference_only=int(b), gap=float(gap),
                                   tolerance=float(tol))
        if why is None:
            excused += d
        else:
            real += d
            if first is None:
                first = dict(token=i, ours=sorted(so), reference=sorted(sr), **why)
    dx = np.abs(np.asarray(ours.x, np.float64) - np.asarray(ref.x, np.float64))
    return {"layer": layer, "tokens": n, "choices": n * k, "differing": differing, "excused": excused,
            "real": real, "input_max_abs": float(dx.max()) if dx.size else 0.0,
            "tolerance_max": float(t.max()) if t.size else 0.0, "factor": factor, "first_real": first,
            "passed": real == 0}


def compare_router(ours: Dict[int, RouterLayer], ref: Dict[int, RouterLayer], n_group: int, topk_group: int,
                   dtype: str = "float32", factor: float = DEFAULT_FACTOR) -> List[Dict]:
    """compare_layer for every MoE layer (keys: decoder layer indices), in layer order."""
    if sorted(ours) != sorted(ref):
        raise ValueError(f"MoE layers differ: ours {sorted(ours)}, the reference's {sorted(ref)}")
    return [compare_layer(i, ours[i], ref[i], n_group, topk_group, dtype, factor) for i in sorted(ours)]


def describe(r: Dict) -> str:
    """One report line of a layer."""
    line = (f"router layer {r['layer']}: {r['tokens']} tokens, {r['choices']} choices compared, {r['differing']} "
            f"differing ({r['excused']} excused near-ties, {r['real']} real); router input max abs err "
            f"{r['input_max_abs']:.2e}")
    f = r["first_real"]
    if f is not None:
        line += (f"; first real divergence at token {f['token']}: experts {f['ours']} (ours) vs {f['reference']} "
                 f"(reference), our {f['kind']} score of {f['ours_only']} exceeds that of {f['reference_only']} by "
                 f"{f['gap']:.3e} > tolerance {f['tolerance']:.3e}")
    return line
