"""Rotary embeddings of GLM-4.1V and the 3D position ids of its decoder.

Two conventions live here, and mixing them up is silently wrong:

* vision: half-split ("NeoX") rotation over the whole head, angles laid out [h, w, h, w], computed in fp32;
* text: M-RoPE on interleaved pairs (GPT-J style) of the first ``rotary_dim`` dims of each head, frequency j taking
  its position from the t, h or w row according to ``mrope_section``; GLM-4.5V/4.6V (glm4v_moe) instead pair dim i
  with i + rotary_dim/2 ("NeoX" rotate_half over the rotary dims), same frequencies and sections.

The text rotation is computed in the *half layout*: at load time the q/k projection rows of every head are permuted
(``half_layout_permutation``; ``neox_layout_permutation`` for glm4v_moe) so that the interleaved partial rotation becomes a half-split rotation over the whole
head with cos = 1, sin = 0 on the pass-through dims. Scores q.k are unchanged by a permutation applied to both q and
k, the arithmetic per rotated pair is the same (bit for bit in fp32), and one rotation convention serves the ViT,
the decoder and Ascend's fused ``rotary_position_embedding`` (mode 0, which unlike mode 1 accepts per-row positions).
"""

from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2j/dim) for j < dim/2, in fp32 as the reference computes it."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Vision 2D rotary
# ---------------------------------------------------------------------------------------------------------------

def patch_coords(grid_thw: np.ndarray, merge: int) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column of every patch, in the processor's patch order.

    For each item (t, h, w) the patches come as: t, block row, block col, in-block row, in-block col, with
    ``merge x merge`` blocks. Returns (hpos, wpos), each [sum(t*h*w)] int64.
    """
    hs, ws = [], []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
        # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]
        rows = rows.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
        hs.append(np.tile(rows, t))
        ws.append(np.tile(cols, t))
    return np.concatenate(hs), np.concatenate(ws)


def vision_cos_sin(hpos: np.ndarray, wpos: np.ndarray, head_dim: int, theta: float) -> Tuple[np.ndarray, np.ndarray]:
    """cos/sin [N, head_dim] (fp32) of the vision rotary: angles [h-angles, w-angles, h-angles, w-angles].

    The rotary module has dim = head_dim / 2, hence head_dim / 4 frequencies per axis."""
    inv = inv_freq(head_dim // 2, theta)
    ah = hpos.astype(np.float32)[:, None] * inv[None, :]
    aw = wpos.astype(np.float32)[:, None] * inv[None, :]
    half = np.concatenate([ah, aw], axis=1)
    emb = np.concatenate([half, half], axis=1).astype(np.float32)
    return np.cos(emb), np.sin(emb)


# ---------------------------------------------------------------------------------------------------------------
# Text M-RoPE
# ---------------------------------------------------------------------------------------------------------------

def mrope_axis_of_frequency(mrope_section: Sequence[int]) -> np.ndarray:
    """Which position row (0 = t, 1 = h, 2 = w) each frequency j takes its angle from. [8, 12, 12] -> 8 zeros,
    12 ones, 12 twos."""
    return np.concatenate([np.full(n, axis, dtype=np.int32) for axis, n in enumerate(mrope_section)])


def half_layout_permutation(head_dim: int, rotary_dim: int) -> np.ndarray:
    """perm[new] = old index within one head, turning the interleaved partial rotary into a full-width half split.

    Old layout: pairs (2i, 2i+1), i < P = rotary_dim/2, rotate with frequency i; dims rotary_dim.. pass through.
    New layout: old 2i -> i and old 2i+1 -> i + head_dim/2 (so the pair is (i, i + head_dim/2) as rotate_half wants);
    the pass-through dims fill the rest of each half in order. Example head_dim 8, rotary_dim 4:
    perm = [0, 2, 4, 5, 1, 3, 6, 7]."""
    if rotary_dim % 2 or head_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
    half, p = head_dim // 2, rotary_dim // 2
    rest = list(range(rotary_dim, head_dim))
    first = [2 * i for i in range(p)] + rest[:half - p]
    second = [2 * i + 1 for i in range(p)] + rest[half - p:]
    return np.array(first + second, dtype=np.int64)


def neox_layout_permutation(head_dim: int, rotary_dim: int) -> np.ndarray:
    """perm[new] = old index within one head for GLM-4.5V/4.6V's decoder (glm4v_moe), whose partial rotary is
    already half-split ("NeoX" rotate_half) but only over the first ``rotary_dim`` dims: dim i pairs with
    i + rotary_dim/2 (i < P = rotary_dim/2), dims rotary_dim.. pass through. New layout, as for
    ``half_layout_permutation``: pair (i, i + head_dim/2), pass-through dims filling the rest of each half in order.
    Example head_dim 8, rotary_dim 4: perm = [0, 1, 4, 5, 2, 3, 6, 7]; head_dim == rotary_dim: the identity."""
    if rotary_dim % 2 or head_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]")
    half, p = head_dim // 2, rotary_dim // 2
    rest = list(range(rotary_dim, head_dim))
    first = list(range(p)) + rest[:half - p]
    second = list(range(p, 2 * p)) + rest[half - p:]
    return np.array(first + second, dtype=np.int64)


def text_cos_sin(position_ids: Tensor, inv: Tensor, axis_of_freq: Tensor, head_dim: int, dtype) -> Tuple[Tensor, Tensor]:
    """cos/sin [B, S, head_dim] for M-RoPE in the half layout (see ``half_layout_permutation``): each half is
    [cos of the F frequencies, ones] (sin: [sin, zeros]).

    position_ids: [3, B, S] int; inv: [F] fp32; axis_of_freq: [F] int32. Angles in fp32, then cast to the
    activation dtype as the reference does. Works in PyNative and inside ``mindspore.jit``."""
    pos = ops.gather(position_ids, axis_of_freq, 0).astype(ms.float32)  # [F, B, S]: row chosen per frequency
    ang = pos.transpose(1, 2, 0) * inv  # [B, S, F]
    b, sl, f = ang.shape
    pad = head_dim // 2 - f
    c, s = mint.cos(ang), mint.sin(ang)
    if pad:
        c = mint.cat([c, mint.ones((b, sl, pad), dtype=ms.float32)], -1)
        s = mint.cat([s, mint.zeros((b, sl, pad), dtype=ms.float32)], -1)
    c, s = mint.cat([c, c], -1), mint.cat([s, s], -1)  # [B, S, head_dim]
    return c.astype(dtype), s.astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# 3D position ids
# ---------------------------------------------------------------------------------------------------------------

def get_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                   image_token_id: int, video_start_token_id: int, video_end_token_id: int,
                   spatial_merge_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """3D (t, h, w) position ids of a (left-padded) batch, and the per-sample rope delta.

    Pure function of host arrays. Returns ``position_ids`` [3, B, S] int64 and ``rope_deltas`` [B, 1] int64 with
    delta = max(position) + 1 - S (S = padded length, the transformers 4.57 convention), so that decode step k
    (absolute cache index k) gets position k + delta on every axis.

    Rules, per sample, over its unpadded tokens:
    * ``image_token_id`` between ``video_start`` and ``video_end`` is a video token, elsewhere an image token,
      every other token (including begin/end markers and timestamp digits) is text;
    * runs of equal type are placed one after another, each starting at st = max(previous positions) + 1;
    * a text run of length L gets st .. st+L-1 on all three axes;
    * an image run takes the next ``image_grid_thw`` row (t, H, W) and gets t = st, h = st + row, w = st + col over
      the merged grid (H/m) x (W/m);
    * a video run is one temporal group of the current ``video_grid_thw`` row, placed like an image with t = 1;
      after T runs the next video row is used.
    Pad positions (attention_mask == 0) get 1.

    Worked example (image grid (1, 6, 10), merge 2 -> 3 x 5 merged tokens):
        tokens  a  b  <boi> [15 x <|image|>]                       <eoi> c  d  e
        t       0  1  2     3 3 3 3 3  3 3 3 3 3  3 3 3 3 3         8     9  10 11
        h       0  1  2     3 3 3 3 3  4 4 4 4 4  5 5 5 5 5         8     9  10 11
        w       0  1  2     3 4 5 6 7  3 4 5 6 7  3 4 5 6 7         8     9  10 11
        delta = 12 - 22 = -10

    Video grid (2, 4, 6) -> 2 groups of 2 x 3:
        x <bov> <boi> [6 img] <eoi> "20" <boi> [6 img] <eoi> "21" <eov> y z
        t: 0 1 2 | 3 3 3 3 3 3 | 6 7 8 | 9 9 9 9 9 9 | 12 13 14 15 16
        h: 0 1 2 | 3 3 3 4 4 4 | 6 7 8 | 9 9 9 10 10 10 | 12 ...
        w: 0 1 2 | 3 4 5 3 4 5 | 6 7 8 | 9 10 11 9 10 11 | 12 ...
        delta = 17 - 23 = -6
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    b, s = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    m = spatial_merge_size
    img = None if image_grid_thw is None else np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    vid = None if video_grid_thw is None else np.asarray(video_grid_thw, dtype=np.int64).reshape(-1, 3)

    if img is None and vid is None:
        if attention_mask is None:
            pos = np.broadcast_to(np.arange(s, dtype=np.int64), (3, b, s)).copy()
            return pos, np.zeros((b, 1), dtype=np.int64)
        p = np.cumsum(mask, axis=-1) - 1
        p[mask == 0] = 1
        pos = np.broadcast_to(p, (3, b, s)).copy()
        deltas = p.max(axis=-1, keepdims=True) + 1 - s
        return pos, deltas.astype(np.int64)

    pos = np.ones((3, b, s), dtype=np.int64)
    deltas = np.zeros((b, 1), dtype=np.int64)
    image_index = video_index = video_group = 0
    for i in range(b):
        keep = mask[i] == 1
        toks = ids[i][keep]
        types: List[str] = []
        in_video = False
        for tok in toks:
            if tok == video_start_token_id:
                in_video = True
            elif tok == video_end_token_id:
                in_video = False
            types.append(("video" if in_video else "image") if tok == image_token_id else "text")
        chunks = []
        st = 0
        offset = 0
        for kind, grp in itertools.groupby(types):
            n = len(list(grp))
            if kind == "text":
                chunks.append(np.broadcast_to(np.arange(n, dtype=np.int64) + st, (3, n)))
            else:
                if kind == "image":
                    if img is None or image_index >= len(img):
                        raise ValueError(f"sample {i}: more image token runs than rows in image_grid_thw "
                                         f"({0 if img is None else len(img)})")
                    t, gh, gw = img[image_index]
                    image_index += 1
                else:
                    if vid is None or video_index >= len(vid):
                        raise ValueError(f"sample {i}: more video frame groups than video_grid_thw describes")
                    t = 1
                    gh, gw = vid[video_index][1], vid[video_index][2]
                    video_group += 1
                    if video_group >= vid[video_index][0]:
                        video_index += 1
                        video_group = 0
                lh, lw = gh // m, gw // m
                if n != t * lh * lw:
                    raise ValueError(f"sample {i}: a run of {n} {kind} tokens at position {offset} does not match its "
                                     f"grid (t={t}, h={gh}, w={gw}) -> {t * lh * lw} tokens; check the prompt's "
                                     "placeholder expansion")
                tt = np.repeat(np.arange(t, dtype=np.int64), lh * lw)
                hh = np.tile(np.repeat(np.arange(lh, dtype=np.int64), lw), t)
                ww = np.tile(np.arange(lw, dtype=np.int64), t * lh)
                chunks.append(np.stack([tt, hh, ww]) + st)
            st = int(chunks[-1].max()) + 1
            offset += n
        if chunks:
            p = np.concatenate(chunks, axis=1)
            pos[:, i, keep] = p
            deltas[i, 0] = int(p.max()) + 1 - s
        else:
            deltas[i, 0] = 1 - s
    return pos, deltas
