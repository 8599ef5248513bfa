"""Parity report for your own checkpoint: glm4v_ms against transformers, stage by stage, on the same inputs.

    python tools/parity.py MODEL_DIR --image a.jpg [--image b.jpg ...] [--video clip.mp4] --prompt "..."
        [--reference_dir HF_DIR] [--dtype float32|bfloat16] [--device CPU|Ascend] [--tokens 16]
        [--layers every:4|all|0,5,39] [--json] [--max_rel_vision X] [--max_rel_hidden X] [--max_rel_logits X]
        [--min_cosine X] [--token_margin X] [--mode graph|eager] [--router_tie_factor X]

Needs torch and the pinned transformers (``pip install -r requirements-dev.txt``). The messages are built exactly as
generate.py builds them (media items, then the text) and processed once by glm4v_ms's numpy processor; the same
arrays, as torch tensors, go to the reference. The reference is ``transformers.Glm4vForConditionalGeneration`` (or
``Glm4vMoeForConditionalGeneration`` when config.json says ``glm4v_moe``: GLM-4.5V / GLM-4.6V) from
``--reference_dir`` (default MODEL_DIR) in fp32 on CPU with eager attention, eval, no_grad; ours is the class
``glm4v_ms.load_model`` picks for MODEL_DIR, in ``--dtype`` on ``--device``. A folder written by
tools/convert.py or a GPTQ folder cannot be read by transformers: give the original Hugging Face folder as
``--reference_dir``.

Memory: the two models are never held at once (the 9B model takes ~41 GB in fp32). The reference runs first; only
the numpy arrays of the compared stages, its greedy tokens and per-step logits are kept; the torch model is deleted
and garbage-collected before ours is loaded. Peak memory is one model plus the prompt's activations and logits.
MoE models run in the other order (ours first: the reference is routed as ours, see below) and keep the same
arrays, plus our plain-forward logits at each of our greedy steps ([tokens, vocab]) and each MoE layer's router
input (fp32 [prompt tokens, hidden]) of both sides: about 0.74 GB per side for a 1000-token prompt on GLM-4.5V (45
MoE layers of width 4096), and our choice scores (fp32 [prompt tokens, 128] per MoE layer).

MoE models: one routing for the stages. In bf16 a near-tie expert choice may flip (excused by the router check
below), and a flipped expert moves that token's output by a whole expert, far beyond the bf16 bounds. So the
layer.K and logits stages are compared with the reference's routers forced to OUR choices (forward hooks on each
``mlp.gate``: our experts, with the reference's own sigmoid scores at them, normalised and scaled as its router
does); the stages then measure numerics only, and the report says how many choices were forced to differ from the
reference's own. A wrong expert or MLP weight still shows in the stages; a wrong router shows in router.layer.K.

Stages (each: relative error ||ours - ref|| / ||ref||, max abs error, cosine similarity of the flattened arrays):
  vision.features  the merger output written into the <|image|> slots (images or video)
  embeddings       token embeddings with the features in place (the decoder's input; HF hidden_states[0])
  layer.K          decoder layer K's output, before the final norm, captured with hooks on the reference's layers
                   (note: HF's own output_hidden_states[-1] is the *normed* last state; ours is not; hooks avoid it)
  logits           the logits of every prompt position
  router.layer.K   (MoE models) layer K's expert choices for every prompt token, compared exactly as sets: the
                   reference's router input and its OWN choices are captured by a forward hook on each MoE layer's
                   ``mlp.gate`` (before its output is replaced by ours), ours by a pre-hook on our gate and
                   output_router_choices. Both router inputs come from the same routing of the earlier layers
                   (ours), so they differ by numerics only and an earlier flip does not widen the tolerance below.
                   Each line also gives how many of our choices were forced on the reference. A differing choice is
                   excused as a near-tie only when, in OUR choice scores, the gap between the experts swapped (or
                   the groups swapped, with group-limited routing) is within what the measured error of that
                   token's router input (and rounding) can move the scores, times --router_tie_factor (default 2);
                   else it is a real divergence and FAILS. Each line gives the tokens, the choices compared, the
                   differing ones and how many were excused (glm4v_ms/apps/router_check.py has the rule).
  tokens           the first --tokens greedy tokens of each side (no repetition penalty or other processors on
                   either side; EOS may stop), decoded with the tokenizer, and the first index where they differ.
                   A difference FAILS only if, at that step, the reference's logit margin between its token and
                   ours exceeds the token-margin tolerance, else it is reported as a near-tie and passes. The
                   tolerance (or --token_margin) is 2 x the max abs logits error AT THAT POSITION: ours from a
                   plain forward over the prompt and the common tokens before it, against the reference's logits
                   of that step. Each of the two logits can be off by that error, so a smaller margin may be
                   rounding; a larger one is a real divergence (e.g. in our decode path, which the plain forward
                   does not use). A side that stops early (EOS) where the other does not always FAILS.

Default thresholds (each overridable):
  float32:  rel err <= 1e-4 for vision features, embeddings / hidden states and logits; cosine >= 0.99999.
            (Measured on a tiny random model, tests/test_parity_tool.py: 1.3e-7 .. 1.3e-6 per stage; fp32
            summation order alone gives ~1e-6.)
  bfloat16: rel err <= 3e-2 vision features, <= 5e-2 embeddings / hidden states, <= 5e-2 logits; cosine >= 0.998.
            (bf16 keeps 8 significant bits: one rounding is up to 2e-3 relative, and it accumulates over the blocks.
            Emulated on the tiny model (2 ViT blocks, 3 decoder layers): vision 1.4e-2, embeddings 2.3e-3, layers
            1.2e-2 .. 1.5e-2, logits 1.6e-2, cosine >= 0.99986. The tiny MoE model (3 decoder layers, 16 experts,
            top 4), routed as ours: layers 1.1e-2 .. 2.6e-2, logits 2.2e-2 .. 2.9e-2 (30- and 57-token prompts;
            without the forcing: MoE layers 5.0e-2 .. 1.3e-1, logits 5.0e-2 / 1.4e-1). Not yet measured on the
            real 24-block ViT and 40- / 46-layer decoders, where more rounding steps accumulate: a real-model run
            that exceeds these bounds with near-tie tokens needs calibration, not necessarily a fix.
            The cosine floors are implied by the relative bounds: since ||a - b|| >= ||b|| sin(angle), rel err
            <= r gives cosine >= sqrt(1 - r^2) (0.99875 for 5e-2, 1 - 5e-9 for 1e-4). So with the default bounds
            the cosine check never fails before the relative one; it is a backstop when those are loosened, and
            the cosine column tells a direction error (low cosine) from a scale error (high cosine, high rel).)
--dtype bfloat16 on Ascend loads real bf16 parameters. On CPU (no bf16 matmul in MindSpore) bf16 is EMULATED: fp32
parameters rounded to bf16, and the outputs of linear layers, norms, attention, swiglu and rotary rounded to bf16
(glm4v_ms.model.ops.set_bf16_emulation); it approximates a real bf16 run. The reference is always fp32.

--layers: ``every:K`` = layers 0, K, 2K, ... and the last one (default every:4); ``all``; or indices ``0,5,39``
(negative indices count from the end).

Before anything runs, MODEL_DIR and --reference_dir must describe the same architecture (sizes and media token ids
in config.json) and a quantization_config must parse. The reference must load every tensor of its checkpoint: a
missing, unused or differently shaped tensor stops the run, naming them (transformers would leave a missing one at
random values and the report would blame glm4v_ms).

Exit status: 0 everything passes; 1 a stage or the token check fails (named on stdout / in the JSON); 2 usage or
set-up errors (missing folder or media, torch missing, bad --layers, a converted folder without --reference_dir,
a reference that did not load completely or failed, a different model as --reference_dir, a checkpoint glm4v_ms
cannot load), reported as one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

THRESHOLDS = {
    "float32": {"vision": 1e-4, "hidden": 1e-4, "logits": 1e-4, "cosine": 0.99999},
    "bfloat16": {"vision": 3e-2, "hidden": 5e-2, "logits": 5e-2, "cosine": 0.998},
}
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw")


class UsageError(Exception):
    """A usage or set-up problem: one ``error:`` line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    ap = _Parser(prog="tools/parity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="the checkpoint folder glm4v_ms loads")
    ap.add_argument("--image", action="append", default=[], help="image path / URL (repeatable)")
    ap.add_argument("--video", help="video path / URL")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--reference_dir", help="the original Hugging Face folder transformers loads (default MODEL_DIR)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="our dtype (the reference is always fp32); bfloat16 is emulated on CPU")
    ap.add_argument("--device", default="CPU", choices=["CPU", "Ascend"], help="our device (the reference: CPU)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens compared (0: none; default 16)")
    ap.add_argument("--layers", default="every:4", help="decoder layers compared: every:K (default every:4, plus "
                                                        "the last), all, or indices like 0,5,39")
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"], help="our generate mode (default graph)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--max_rel_vision", type=float, help="max relative error of the vision features "
                                                         "(default 1e-4 fp32, 3e-2 bf16)")
    ap.add_argument("--max_rel_hidden", type=float, help="max relative error of the embeddings and hidden states "
                                                         "(default 1e-4 fp32, 5e-2 bf16)")
    ap.add_argument("--max_rel_logits", type=float, help="max relative error of the prompt logits "
                                                         "(default 1e-4 fp32, 5e-2 bf16)")
    ap.add_argument("--min_cosine", type=float, help="min cosine similarity of every stage "
                                                     "(default 0.99999 fp32, 0.998 bf16)")
    ap.add_argument("--token_margin", type=float, help="a differing greedy token fails when the reference prefers "
                                                       "its own token by more than this logit margin (default: 2 x "
                                                       "the max abs logits error at that position)")
    ap.add_argument("--router_tie_factor", type=float, default=2.0,
                    help="MoE models: safety factor of the expert-choice near-tie tolerance (default 2; see "
                         "glm4v_ms/apps/router_check.py)")
    args = ap.parse_args(argv)
    if args.tokens < 0:
        raise UsageError("--tokens must be >= 0")
    if not args.router_tie_factor >= 1:
        raise UsageError(f"--router_tie_factor {args.router_tie_factor}: must be at least 1")
    return args


def parse_layers(spec: str, n_layers: int) -> List[int]:
    """``every:K`` -> 0, K, 2K, ... and the last layer; ``all``; ``0,5,39`` (negatives count from the end)."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n_layers))
    if spec.startswith("every:"):
        try:
            k = int(spec[6:])
        except ValueError:
            k = 0
        if k < 1:
            raise UsageError(f"--layers {spec!r}: every:K needs a positive integer K")
        return sorted(set(range(0, n_layers, k)) | {n_layers - 1})
    out = set()
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise UsageError(f"--layers {spec!r}: expected every:K, all, or comma-separated layer indices") from None
        if not -n_layers <= i < n_layers:
            raise UsageError(f"--layers: layer {i} is out of range; the model has {n_layers} decoder layers "
                             f"(0..{n_layers - 1})")
        out.add(i % n_layers)
    return sorted(out)


def messages(prompt: str, images: Sequence[str], video: Optional[str]) -> List[Dict]:
    """generate.py's messages (glm4v_ms.apps.pipeline.Glm4vPipeline.messages): media items, then the text."""
    from glm4v_ms.apps.pipeline import Glm4vPipeline

    return Glm4vPipeline.messages(prompt, images=images, video=video)


# ----------------------------------------------------------------------------------------------------- metrics
class ShapeMismatch(ValueError):
    pass


def compare(ours: np.ndarray, ref: np.ndarray, stage: str = "array") -> Dict[str, float]:
    if np.size(ours) != np.size(ref):  # compared flattened: [S, H] and [1, S, H] are the same array
        raise ShapeMismatch(f"{stage}: our shape {tuple(np.shape(ours))} != the reference's {tuple(np.shape(ref))}")
    a = np.asarray(ours, np.float64).reshape(-1)
    b = np.asarray(ref, np.float64).reshape(-1)
    nb, na = np.linalg.norm(b), np.linalg.norm(a)
    diff = a - b
    return {"rel_err": float(np.linalg.norm(diff) / max(nb, 1e-30)),
            "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
            "cosine": float(np.dot(a, b) / max(na * nb, 1e-300))}


# ----------------------------------------------------------------------------------------------------- reference
class ReferenceLoadError(UsageError):
    """The reference checkpoint did not load completely: its report would be meaningless."""


def _names(keys, limit: int = 4) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_reference_loaded(ref_dir: str, info: Dict, model=None) -> None:
    """Raise ReferenceLoadError naming every kind of tensor transformers did not load as stored in ``ref_dir``."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_names(sorted(info['missing_keys']))} (left at random values)")
    if info.get("mismatched_keys"):
        def described(item):  # transformers 4.57 lists names; other versions (name, checkpoint shape, model shape)
            if isinstance(item, (tuple, list)):
                return f"{item[0]} {tuple(item[1])} in the checkpoint vs {tuple(item[2])} expected"
            return f"{item} (the model expects {tuple(shapes[item])})" if item in shapes else str(item)

        shapes = {k: v.shape for k, v in model.state_dict().items()} if model is not None else {}
        problems.append("shape mismatch " + _names(described(k) for k in sorted(info["mismatched_keys"])))
    if info.get("unexpected_keys"):
        problems.append(f"not used {_names(sorted(info['unexpected_keys']))}")
    if problems:
        raise ReferenceLoadError(f"the reference checkpoint {ref_dir} did not load every tensor into transformers' "
                                 f"model: {'; '.join(problems)}; fix or replace that folder (a reference with "
                                 "random tensors would make the report blame glm4v_ms)")


# the fields of a glm4v_moe decoder that decide its routing and expert shapes
MOE_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group",
              "topk_group", "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor")

SHAPE_FIELDS = {"text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "num_key_value_heads", "head_dim"),
                "vision": ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "in_channels",
                           "patch_size", "temporal_patch_size", "spatial_merge_size"),
                "": ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                     "video_start_token_id", "video_end_token_id")}


def check_same_model(ours, ref) -> None:
    """MODEL_DIR and --reference_dir must describe the same architecture (the compared arrays' shapes and the media
    token ids), checked from the two config.json files before anything runs."""
    diffs = []
    if ours.is_moe != ref.is_moe:
        diffs.append(f"model_type {ours.model_type} vs {ref.model_type}")
    elif ours.is_moe:
        diffs += [f"text.{n} {getattr(ours.text, n)} vs {getattr(ref.text, n)}" for n in MOE_FIELDS
                  if getattr(ours.text, n) != getattr(ref.text, n)]
    for part, names in SHAPE_FIELDS.items():
        a, b = (getattr(c, part) if part else c for c in (ours, ref))
        for n in names:
            if getattr(a, n) != getattr(b, n):
                diffs.append(f"{part + '.' if part else ''}{n} {getattr(a, n)} vs {getattr(b, n)}")
    if diffs:
        raise UsageError(f"MODEL_DIR and --reference_dir are different models ({_names(diffs)}, ours vs the "
                         "reference): give the Hugging Face folder MODEL_DIR was made from")


def reference_config_457(ref_dir: str) -> Optional[Dict]:
    """The reference's config.json in the form transformers 4.57's Glm4vConfig reads, or None when the file already
    is in it. A transformers 5.x file (``model_type`` ``glm46v``, ``rope_parameters``) is read by our parser and
    written back in 4.57's nested form with every token id explicit: 4.57 would silently ignore
    ``rope_parameters`` (no M-RoPE sections) and give a ``glm46v`` folder 4.1V's default video ids."""
    from glm4v_ms.model.config import Glm4vConfig

    with open(os.path.join(ref_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    text_raw = raw.get("text_config") or raw
    if raw.get("model_type", "glm4v") in ("glm4v", "glm4v_moe") and "rope_parameters" not in text_raw:
        return None
    c = Glm4vConfig.from_dict(raw)
    t, v = c.text, c.vision
    text = {k: getattr(t, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "hidden_act",
                                       "max_position_embeddings", "rms_norm_eps", "rope_theta",
                                       "partial_rotary_factor", "pad_token_id", "eos_token_id")}
    text.update(rope_scaling={"type": t.rope_type, "mrope_section": list(t.mrope_section)},
                attention_bias=text_raw.get("attention_bias", True), tie_word_embeddings=t.tie_word_embeddings)
    if c.is_moe:  # 4.57's Glm4vMoeTextConfig: the MoE fields and the explicit head_dim
        text.update({k: getattr(t, k) for k in MOE_FIELDS + ("head_dim", "attention_bias")})
    vision = {k: getattr(v, k) for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                                         "hidden_act", "attention_bias", "in_channels", "patch_size",
                                         "temporal_patch_size", "spatial_merge_size", "image_size", "rms_norm_eps")}
    ids = {k: getattr(c, k) for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                      "image_end_token_id", "video_start_token_id", "video_end_token_id")}
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=t.tie_word_embeddings, **ids)


def run_reference(ref_dir: str, inputs: Dict[str, np.ndarray], layers: List[int], tokens: int, eos: List[int],
                  pad: int, moe: bool = False, force: Optional[Dict[int, np.ndarray]] = None) -> Dict:
    """The transformers model in fp32 on CPU: the compared stages as numpy, then greedy tokens and their raw logits.
    ``moe`` (a glm4v_moe folder): transformers' Glm4vMoeForConditionalGeneration, and each MoE layer's router
    input, its OWN chosen experts and gate weights (``router``: layer -> router_check.RouterLayer).
    ``force`` (MoE: decoder layer -> expert ids [B*S, K], our choices): during the staged forward each MoE layer
    routes to these experts instead of its own (see force_router_output); ``forced``: layer -> how many choices
    differed from the reference's own. The greedy tokens are always generated unforced.
    The torch model lives only inside this function."""
    import torch
    import transformers

    extra = {}
    legacy = reference_config_457(ref_dir)
    if legacy is not None:
        extra["config"] = (transformers.Glm4vMoeConfig if moe else transformers.Glm4vConfig)(**legacy)
    cls = transformers.Glm4vMoeForConditionalGeneration if moe else transformers.Glm4vForConditionalGeneration
    # output_loading_info: transformers only logs (and parity.py silences) a tensor it did not load and leaves it at
    # its random initial value; the report would then blame our side. ignore_mismatched_sizes turns a shape
    # mismatch from a long RuntimeError into mismatched_keys, so all three are named the same way.
    model, info = cls.from_pretrained(
        ref_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True,
        ignore_mismatched_sizes=True, **extra)
    check_reference_loaded(ref_dir, info, model)
    model.eval()
    vis, lm = model.model.visual, model.model.language_model
    st: Dict = {"layers": {}}
    want = set(layers)

    def layer_hook(i):
        def hook(module, args, output):
            if i in want:
                out = output[0] if isinstance(output, tuple) else output
                st["layers"][i] = out.detach().float().numpy().copy()
        return hook

    hooks = [vis.merger.register_forward_hook(lambda m, i, o: st.__setitem__("features", o.detach().numpy().copy())),
             lm.layers[0].register_forward_pre_hook(
                 lambda m, a, k: st.__setitem__("embeddings", (a[0] if a else k["hidden_states"]).detach().numpy()
                                                .copy()), with_kwargs=True)]
    hooks += [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(lm.layers)]
    if moe:
        from glm4v_ms.apps.router_check import RouterLayer

        st["router"] = {}
        if force is not None:
            st["forced"] = {}

        def gate_hook(i):
            # Glm4vMoeTextTopkRouter: hidden [B, S, H] -> (topk_indices [B*S, K], topk_weights [B*S, K]).
            # The router check gets the reference's OWN choice from its own router input. With ``force``, every
            # earlier MoE layer of the reference has already routed to our choices, so this input and ours (captured
            # by our gate's pre-hook) come from the same routing and differ by numerics only: the check compares
            # like with like, and the tolerance from the measured input error is not inflated by an earlier flip.
            # The output returned (our choices) is what the rest of this forward, the stages, uses.
            def hook(module, args, output):
                x = args[0].detach().float()
                st["router"][i] = RouterLayer(
                    x=x.reshape(-1, x.shape[-1]).numpy().copy(), ids=output[0].detach().numpy().copy(),
                    weight=module.weight.detach().float().numpy().copy(),
                    bias=module.e_score_correction_bias.detach().float().numpy().copy())
                if force is None:
                    return None
                ids, weights, n = force_router_output(module, args[0], output, force[i], i)
                st["forced"][i] = n
                return ids, weights
            return hook

        hooks += [layer.mlp.gate.register_forward_hook(gate_hook(i)) for i, layer in enumerate(lm.layers)
                  if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "e_score_correction_bias")]
    t_in = {k: torch.tensor(v) for k, v in inputs.items() if v is not None}
    try:
        with torch.no_grad():
            st["logits"] = model(**t_in, use_cache=False).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    st["new_tokens"], st["step_logits"] = [], []
    if tokens:
        gc_ = transformers.GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=tokens,
                                            eos_token_id=list(eos) or None, pad_token_id=pad,
                                            output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():  # use_model_defaults=False: the checkpoint's penalty / top-k do not creep back in
            out = model.generate(**t_in, generation_config=gc_, use_model_defaults=False)
        s = inputs["input_ids"].shape[1]
        st["new_tokens"] = out.sequences[0, s:].tolist()
        st["step_logits"] = [x[0].float().numpy().copy() for x in out.logits]
        del out
    del model, t_in
    gc.collect()
    return st


def force_router_output(router, hidden, own, ids, layer: int):
    """The output of transformers' Glm4vMoeTextTopkRouter ``router`` (called on ``hidden`` [B, S, H], its own output
    ``own`` = (topk_indices, topk_weights)) forced to route each token to the experts ``ids`` [B*S, K] (ours).
    The weights are the router's: its own sigmoid scores of ``hidden`` (the same fp32 ops as its forward) gathered at
    those experts, divided by their sum + 1e-20 when ``norm_topk_prob``, times ``routed_scaling_factor``. A token
    whose set of experts equals the reference's own keeps its own row (indices and weights, bit for bit: only the
    order of the K ids could differ, which would change the denominator's rounding), so forcing the reference's own
    choices changes nothing. Returns (indices, weights, number of forced choices that differ from its own)."""
    import torch

    own_ids, own_w = own
    if tuple(ids.shape) != tuple(own_ids.shape):
        raise ShapeMismatch(f"router layer {layer}: our expert choices {tuple(ids.shape)} do not match the "
                            f"reference's {tuple(own_ids.shape)}")
    ids_t = torch.as_tensor(np.asarray(ids, np.int64))
    same_sets = (torch.sort(ids_t, -1)[0] == torch.sort(own_ids, -1)[0]).all(-1, keepdim=True)
    # choices of ours the reference did not make (per token: |ours - its own|)
    forced = int((~(ids_t[:, :, None] == own_ids[:, None, :]).any(-1)).sum())
    x = hidden.reshape(-1, router.config.hidden_size)
    scores = torch.nn.functional.linear(x.type(torch.float32), router.weight.type(torch.float32)).sigmoid()
    w = scores.gather(1, ids_t)
    if router.norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * router.routed_scaling_factor
    return torch.where(same_sets, own_ids, ids_t), torch.where(same_sets, own_w, w), forced


# ----------------------------------------------------------------------------------------------------- ours
def our_greedy(model, inputs: Dict[str, np.ndarray], tokens: int, eos: List[int], pad: int, mode: str) -> List[int]:
    """Our first ``tokens`` greedy tokens (no penalty or other processors, like the reference's)."""
    import glm4v_ms

    seq = glm4v_ms.generate(model, **inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=tokens,
                            eos_token_id=list(eos), pad_token_id=pad, mode=mode)
    return seq[0, inputs["input_ids"].shape[1]:].tolist()


def first_difference(ours: Sequence[int], ref: Sequence[int]) -> Optional[int]:
    n = min(len(ours), len(ref))
    first = next((i for i in range(n) if ours[i] != ref[i]), None)
    if first is None and len(ours) != len(ref):
        first = n  # one side stopped (EOS) where the other did not: only possible with different EOS sets
    return first


def teacher_forced_logits(model, inputs: Dict[str, np.ndarray], prefix: Sequence[int], keep: int = 1):
    """Our logits [keep, V] for the last ``keep`` positions of prompt + ``prefix`` (a plain forward, no cache); the
    last one scores the token after the prefix: what the reference's generate scored at that step, so the error
    there can be measured."""
    ids = inputs["input_ids"]
    x = dict(inputs, input_ids=np.concatenate([ids, np.asarray([list(prefix)], ids.dtype)], axis=1))
    if inputs.get("attention_mask") is not None:
        am = inputs["attention_mask"]
        x["attention_mask"] = np.concatenate([am, np.ones((1, len(prefix)), am.dtype)], axis=1)
    return model(**x, logits_to_keep=keep).logits[0]


def run_ours(model_dir: str, inputs: Dict[str, np.ndarray], layers: List[int], tokens: int, eos: List[int],
             pad: int, dtype: str, device: str, mode: str, ref_tokens: Optional[Sequence[int]] = ()) -> Dict:
    """Our stages as numpy and our greedy tokens; where they first differ from ``ref_tokens`` (both sides produced
    a token there), also our logits at that position (``divergence``: (step, logits [V])). ``ref_tokens`` None
    (MoE models, where ours runs before the reference): the reference's tokens are not known yet, so our
    plain-forward logits at every step of our own tokens are kept instead (``step_logits`` [n, V], one forward
    over the prompt and our tokens); add_divergence picks the diverging step's row later. Up to the first
    difference our tokens are the reference's, so that row scores the same prefix as the reference's step."""
    import mindspore as ms
    import glm4v_ms
    from glm4v_ms.model import ops

    target = ops.device_target()
    emulate = dtype == "bfloat16" and target == "CPU"
    load_dtype = ms.bfloat16 if dtype == "bfloat16" and not emulate else ms.float32
    model = glm4v_ms.load_model(model_dir, dtype=load_dtype)  # the class config.json names
    if emulate:
        model.round_parameters(ms.bfloat16)
        glm4v_ms.model.ops.set_bf16_emulation(True)

    def f32(t):
        if isinstance(t, ms.Tensor):
            return (t if t.dtype == ms.float32 else t.astype(ms.float32)).asnumpy()
        return np.asarray(t, np.float32)

    st: Dict = {}
    try:
        has_media = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        if model.config.is_moe:
            from glm4v_ms.apps.router_check import forward_with_router

            out, st["router"] = forward_with_router(model, inputs, output_hidden_states=True,
                                                    output_vision_stages=has_media)
        else:
            out = model(**inputs, output_hidden_states=True, output_vision_stages=has_media)
        if has_media:
            st["features"] = f32(out.vision_stages["merger"])
        st["embeddings"] = f32(out.hidden_states[0])
        st["layers"] = {i: f32(out.hidden_states[i + 1]) for i in layers}  # [0] is the embeddings
        st["logits"] = f32(out.logits)
        del out
        st["new_tokens"] = our_greedy(model, inputs, tokens, eos, pad, mode) if tokens else []
        n = len(st["new_tokens"])
        if ref_tokens is None:
            if n:
                st["step_logits"] = f32(teacher_forced_logits(model, inputs, st["new_tokens"][:n - 1], keep=n))
            ref_tokens = ()
        k = first_difference(st["new_tokens"], list(ref_tokens))
        if k is not None and k < min(n, len(ref_tokens)):
            # the prefix before k is common to both sides; step 0 is the prompt's last position
            lg = st["logits"][0, -1] if k == 0 else f32(teacher_forced_logits(model, inputs, ref_tokens[:k]))
            st["divergence"] = (k, np.asarray(lg, np.float32).reshape(-1))
    finally:
        glm4v_ms.model.ops.set_bf16_emulation(False)
    st["emulated"] = emulate
    return st


def add_divergence(ours: Dict, ref_tokens: Sequence[int]) -> None:
    """run_ours(ref_tokens=None)'s side, once the reference's tokens are known: ``divergence`` (step, our logits
    there) where the two first differ and both produced a token."""
    k = first_difference(ours["new_tokens"], list(ref_tokens))
    if k is not None and k < min(len(ours["new_tokens"]), len(ref_tokens)):
        ours["divergence"] = (k, np.asarray(ours["step_logits"][k], np.float32).reshape(-1))


# ----------------------------------------------------------------------------------------------------- report
def token_check(ours: List[int], ref: List[int], step_logits: List[np.ndarray], tolerance: float) -> Dict:
    first = first_difference(ours, ref)
    res = {"ours": ours, "reference": ref, "first_divergence": first, "margin": None,
           "margin_tolerance": tolerance, "near_tie": False, "pass": True}
    if first is None:
        return res
    if first < len(ours) and first < len(ref) and first < len(step_logits):
        lg = step_logits[first]
        margin = float(lg[ref[first]] - lg[ours[first]])
        res["margin"] = margin
        res["near_tie"] = margin <= tolerance
        res["pass"] = res["near_tie"]
    else:
        res["pass"] = False
    return res


def build_report(ref: Dict, ours: Dict, layers: List[int], th: Dict, token_margin: Optional[float],
                 router: Optional[Dict] = None) -> Dict:
    """``router`` (MoE models): {"n_group", "topk_group", "dtype", "factor"} to compare the expert choices of
    ``ours["router"]`` and ``ref["router"]`` (router_check.compare_router; a real divergence fails the report as
    stage router.layer.K)."""
    stages = []

    def add(name, kind, a, b):
        m = compare(a, b, name)
        ok = m["rel_err"] <= th[kind] and m["cosine"] >= th["cosine"] and math.isfinite(m["rel_err"])
        stages.append(dict(stage=name, **m, max_rel=th[kind], min_cosine=th["cosine"], passed=bool(ok)))

    if "features" in ours:
        add("vision.features", "vision", ours["features"], ref["features"])
    add("embeddings", "hidden", ours["embeddings"], ref["embeddings"])
    for i in layers:
        add(f"layer.{i}", "hidden", ours["layers"][i], ref["layers"][i])
    add("logits", "logits", ours["logits"], ref["logits"])
    # The near-tie tolerance comes from the logits error at the diverging position itself (our plain forward there
    # against the reference's logits of that step): a margin within 2x that error may be rounding (each of the two
    # logits can be off by it), a larger one is a real divergence. The worst error over the whole prompt would
    # excuse a divergence wherever some other position happened to be less exact.
    position_err = None
    if "divergence" in ours:
        k, lg = ours["divergence"]
        position_err = compare(lg, ref["step_logits"][k], f"logits at token {k}")["max_abs"]
    if token_margin is not None:
        tol, basis = token_margin, "--token_margin"
    elif position_err is not None:
        tol, basis = 2.0 * position_err, "2 x the max abs logits error at that position"
    elif first_difference(ours["new_tokens"], ref["new_tokens"]) is None:
        tol, basis = 0.0, "no divergence"
    else:  # one side stopped early: there is no pair of logits to compare, so no excuse either
        tol, basis = 0.0, "no logits of ours at that position"
    tok = token_check(ours["new_tokens"], ref["new_tokens"], ref["step_logits"], tol)
    tok.update(position_max_abs=position_err, tolerance_basis=basis)
    failed = [s["stage"] for s in stages if not s["passed"]]
    routing = []
    if router is not None:
        from glm4v_ms.apps.router_check import compare_router

        routing = compare_router(ours["router"], ref["router"], router["n_group"], router["topk_group"],
                                 router["dtype"], router["factor"])
        failed += [f"router.layer.{r['layer']}" for r in routing if not r["passed"]]
        for r in routing:  # choices of ours the reference was forced to although it chose otherwise
            r["forced"] = ref.get("forced", {}).get(r["layer"])
    if not tok["pass"]:
        failed.append("tokens")
    out = {"stages": stages, "router": routing, "tokens": tok, "failed": failed,
           "verdict": "FAIL" if failed else "PASS"}
    if "forced" in ref:
        # the layer / logits stages ran with the reference's routers forced to our choices (run_reference)
        out["stage_routing"] = {"routed_as": "ours", "forced_choices": int(sum(ref["forced"].values())),
                                "choices": int(sum(r["choices"] for r in routing))}
    return out


def print_table(rep: Dict, header: List[str]) -> None:
    for line in header:
        print(line)
    print()
    cols = f"{'stage':<18} {'rel err':>9} {'max abs':>9} {'cosine':>12}   {'threshold':<27} result"
    sr = rep.get("stage_routing")
    if sr is not None:
        print(f"layer / logits stages compared under OUR expert choices: the reference's routers were forced to them; "
              f"{sr['forced_choices']} of {sr['choices']} choices differed from its own (judged in the expert "
              "choices below)")
    print(cols)
    print("-" * len(cols))
    for s in rep["stages"]:
        thr = f"rel<={s['max_rel']:.0e} cos>={s['min_cosine']:g}"
        print(f"{s['stage']:<18} {s['rel_err']:>9.2e} {s['max_abs']:>9.2e} {s['cosine']:>12.8f}   {thr:<27} "
              f"{'PASS' if s['passed'] else 'FAIL'}")
    if rep.get("router"):
        from glm4v_ms.apps.router_check import describe

        print()
        print(f"expert choices (near-tie tolerance: {rep['router'][0]['factor']:g} x what the router input's "
              "measured error and rounding can move a score)")
        for r in rep["router"]:
            line = describe(r) + ("" if r.get("forced") is None else f"; {r['forced']} forced to ours for the stages")
            print(f"  {line:<100} {'PASS' if r['passed'] else 'FAIL'}")
    t = rep["tokens"]
    print()
    n = max(len(t["ours"]), len(t["reference"]))
    if t["first_divergence"] is None:
        print(f"greedy tokens: identical ({n} tokens)                      PASS")
    else:
        i = t["first_divergence"]
        if t["margin"] is None:
            why = "one side stopped early"
        else:
            why = (f"reference margin {t['margin']:.3e} {'<=' if t['near_tie'] else '>'} tolerance "
                   f"{t['margin_tolerance']:.3e} ({t['tolerance_basis']}): "
                   f"{'near-tie' if t['near_tie'] else 'real divergence'}")
        print(f"greedy tokens: first divergence at token {i} ({why})   {'PASS' if t['pass'] else 'FAIL'}")
    print(f"  ours:      {t['ours']}")
    print(f"             {t.get('ours_text', '')!r}")
    print(f"  reference: {t['reference']}")
    print(f"             {t.get('reference_text', '')!r}")
    print()
    if rep["failed"]:
        print(f"verdict: FAIL ({', '.join(rep['failed'])})")
    else:
        print("verdict: PASS")


# ----------------------------------------------------------------------------------------------------- main
def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def main(argv=None) -> int:
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        return _run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _progress(msg: str) -> None:
    print(f"[parity] {msg}", file=sys.stderr, flush=True)


def _run(args) -> int:
    from glm4v_ms.model.config import Glm4vConfig
    from glm4v_ms.processing.media import MediaError, MissingDependencyError
    from glm4v_ms.processing.processor import PromptError
    from glm4v_ms.model.weights import CheckpointError

    setup_errors = (OSError, ValueError, MediaError, PromptError, CheckpointError, MissingDependencyError, KeyError)
    model_dir = args.model_dir
    ref_dir = args.reference_dir or model_dir
    for name, d in (("MODEL_DIR", model_dir), ("--reference_dir", ref_dir)):
        if not os.path.isdir(d):
            raise UsageError(f"{name} {d}: folder not found")
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise UsageError(f"{name} {d}: no config.json (not a model folder)")
    try:
        config = Glm4vConfig.from_pretrained(model_dir)
    except setup_errors as e:
        raise UsageError(f"MODEL_DIR: {_first_line(e)}") from None
    if args.reference_dir is None and (config.converted or config.quantization is not None):
        kind = "written by tools/convert.py" if config.converted else "a quantised (GPTQ) checkpoint"
        raise UsageError(f"{model_dir} is {kind}; transformers cannot load it as the fp32 reference: pass the "
                         "original Hugging Face folder as --reference_dir")
    if config.quantization is not None:  # a bad quantization_config is found now, not after the reference's run
        from glm4v_ms.model.quant import GPTQConfig

        try:
            GPTQConfig.from_dict(config.quantization)
        except ValueError as e:
            raise UsageError(f"MODEL_DIR {model_dir}: {_first_line(e)}") from None
    if args.reference_dir is not None:
        try:
            ref_config = Glm4vConfig.from_pretrained(ref_dir)
        except setup_errors as e:
            raise UsageError(f"--reference_dir: {_first_line(e)}") from None
        check_same_model(config, ref_config)
    n_layers = config.text.num_hidden_layers
    layers = parse_layers(args.layers, n_layers)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import Glm4vForConditionalGeneration  # noqa: F401
        if config.is_moe:
            from transformers import Glm4vMoeForConditionalGeneration  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the reference needs torch and transformers ({_first_line(e)}); install them with "
                         "pip install -r requirements-dev.txt") from None
    import glm4v_ms
    from glm4v_ms.runtime.generation import GenerationConfig
    from glm4v_ms.processing.processor import Glm4vProcessor

    try:
        glm4v_ms.set_device(args.device)
    except ValueError as e:
        raise UsageError(_first_line(e)) from None
    th = dict(THRESHOLDS[args.dtype])
    for key, opt in (("vision", args.max_rel_vision), ("hidden", args.max_rel_hidden),
                     ("logits", args.max_rel_logits), ("cosine", args.min_cosine)):
        if opt is not None:
            th[key] = opt
    try:
        processor = Glm4vProcessor.from_pretrained(model_dir)
        inputs = processor.apply_chat_template(messages(args.prompt, args.image, args.video),
                                               add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="np")
        inputs = {k: np.asarray(inputs[k]) for k in MODEL_KEYS if inputs.get(k) is not None}
        gen = GenerationConfig.from_pretrained(model_dir, text_config=config.text)
    except setup_errors as e:
        raise UsageError(_first_line(e)) from None
    eos = [int(e) for e in (gen.eos_token_id or [])]
    pad = int(gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0))
    emulated = args.dtype == "bfloat16" and glm4v_ms.model.ops.device_target() == "CPU"
    if emulated:
        print("note: bfloat16 is EMULATED on CPU (fp32 compute; parameters and op outputs rounded to bf16); "
              "run on Ascend for real bf16", file=sys.stderr if args.json else sys.stdout)

    def reference(force=None):
        _progress(f"reference (transformers, fp32, CPU{', routed as ours' if force else ''}): {ref_dir}")
        t = time.perf_counter()
        try:
            out = run_reference(ref_dir, inputs, layers, args.tokens, eos, pad, moe=config.is_moe, force=force)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - transformers' errors (loading, a forward that fails) end in one line
            raise UsageError(f"the reference (transformers, {ref_dir}) failed: {type(e).__name__}: "
                             f"{_first_line(e)}") from None
        gc.collect()
        return out, time.perf_counter() - t

    def our_side(ref_tokens):
        _progress(f"ours (glm4v_ms, {args.dtype}, {args.device}): {model_dir}")
        t = time.perf_counter()
        try:
            out = run_ours(model_dir, inputs, layers, args.tokens, eos, pad, args.dtype, args.device, args.mode,
                           ref_tokens)
        except setup_errors as e:  # QuantConfigError is a ValueError: a GPTQ tensor the config does not describe
            raise UsageError(f"glm4v_ms could not load or run {model_dir}: {_first_line(e)}") from None
        gc.collect()
        return out, time.perf_counter() - t

    if config.is_moe:
        # MoE: ours first, then the reference with its routers forced to our expert choices, so that the stages
        # compare numerics under one routing (a near-tie flip in bf16 would otherwise move a token's output by a
        # whole expert); the routing itself is compared by the router check on the reference's own choices.
        ours, t_ours = our_side(None)
        ref, t_ref = reference({i: r.ids for i, r in ours["router"].items()})
        add_divergence(ours, ref["new_tokens"])
    else:
        ref, t_ref = reference()
        ours, t_ours = our_side(ref["new_tokens"])

    try:
        router = None
        if config.is_moe:
            router = dict(n_group=config.text.n_group, topk_group=config.text.topk_group, dtype=args.dtype,
                          factor=args.router_tie_factor)
        rep = build_report(ref, ours, layers, th, args.token_margin, router)
    except ShapeMismatch as e:
        raise UsageError(f"{e}: MODEL_DIR and --reference_dir are not the same model") from None
    tok = rep["tokens"]
    dec = processor.tokenizer.decode
    tok["ours_text"] = dec(tok["ours"], skip_special_tokens=False)
    tok["reference_text"] = dec(tok["reference"], skip_special_tokens=False)
    n_img = 0 if inputs.get("image_grid_thw") is None else len(inputs["image_grid_thw"])
    meta = {"dtype": args.dtype, "device": args.device, "emulated": bool(ours["emulated"]), "mode": args.mode,
            "model_dir": model_dir, "reference_dir": ref_dir, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "images": n_img, "video": inputs.get("video_grid_thw") is not None, "layers": layers,
            "thresholds": th, "seconds": {"reference": round(t_ref, 2), "ours": round(t_ours, 2)}}
    if args.json:
        print(json.dumps(dict(meta, **rep)))
    else:
        header = [f"glm4v_ms ({args.dtype}{', emulated' if meta['emulated'] else ''}, {args.device}, {args.mode}) vs "
                  f"transformers {transformers.__version__} (fp32, CPU, eager attention)",
                  f"prompt: {meta['prompt_tokens']} tokens, {n_img} image(s){', a video' if meta['video'] else ''}; "
                  f"{len(layers)} of {n_layers} decoder layers compared; reference {t_ref:.1f} s, ours {t_ours:.1f} s"]
        print_table(rep, header)
    return 1 if rep["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
