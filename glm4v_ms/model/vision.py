"""GLM-4.1V vision tower: patch embedding, bicubic position resampling, blocks, downsample, merger.

Module attribute paths equal the checkpoint keys below ``model.visual.``.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from . import ops
from .config import VisionConfig
from .layers import Embedding, LayerNorm, Linear, PatchConv, RMSNorm
from .rope import patch_coords, vision_cos_sin

_BICUBIC_A = np.float32(-0.75)  # torch's bicubic constant (grid_sample, interpolate)


def _cubic1(x):  # |x| <= 1
    a = _BICUBIC_A
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)


def _cubic2(x):  # 1 < |x| < 2
    a = _BICUBIC_A
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] fp32 weights that resample one axis exactly as torch
    ``grid_sample(mode="bicubic", align_corners=False, padding_mode="border")`` does when output sample k is placed at
    normalised coordinate ((k + 0.5) / out_size) * 2 - 1 (the GLM-4.1V position-table lookup).

    Steps, all in fp32 like the reference: normalise, unnormalise with align_corners=False
    (src = ((g + 1) * in - 1) / 2), x0 = floor(src), t = src - x0, four taps x0-1 .. x0+2 with the A = -0.75 cubic
    convolution weights; border padding clamps each *tap index* to [0, in-1] (the coordinate itself is not clipped),
    so clamped taps add their weights to the edge entry.
    """
    k = np.arange(out_size, dtype=np.float32)
    g = ((k + np.float32(0.5)) / np.float32(out_size)) * np.float32(2) - np.float32(1)
    src = ((g + np.float32(1)) * np.float32(in_size) - np.float32(1)) / np.float32(2)
    x0 = np.floor(src)
    t = (src - x0).astype(np.float32)
    coeffs = [_cubic2(t + np.float32(1)), _cubic1(t), _cubic1(np.float32(1) - t), _cubic2(np.float32(2) - t)]
    m = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    for tap, c in enumerate(coeffs):
        idx = np.clip(x0.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (rows, idx), c.astype(np.float32))
    return m


class PatchEmbed(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.proj = PatchConv(cfg.hidden_size, cfg.in_channels,
                              (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size), dtype)

    def construct(self, pixel_values):
        # pixel_values: [N, C*T*P*P] flattened (c, t, y, x), the Conv3d kernel's own order -> [N, hidden]
        return self.proj(pixel_values)


class VisionEmbeddings(nn.Cell):
    """The learned square position table, resampled per item to its patch grid (bicubic, fp32)."""

    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.side = cfg.num_positions_side
        self.merge = cfg.spatial_merge_size
        self.position_embedding = Embedding(self.side * self.side, cfg.hidden_size, dtype)

    def resampled(self, grid_thw: np.ndarray) -> Tensor:
        """Position embeddings [sum(t*h*w), hidden] in patch order, in the table's dtype.

        Separable: for an item of h x w patches, out[r, c] = sum_a Mh[r, a] * (sum_b Mw[c, b] * table[a, b]) with the
        bicubic matrices above (x interpolated first within each table row, then y, as grid_sample does)."""
        s, m = self.side, self.merge
        w = self.position_embedding.weight
        table = w.astype(ms.float32).reshape(s, s, -1)  # [S(rows), S(cols), E]
        e = table.shape[-1]
        out, cache = [], {}
        for t, h, wd in np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3):
            key = (int(h), int(wd))
            if key not in cache:
                mw = Tensor(bicubic_matrix(int(wd), s))
                mh = Tensor(bicubic_matrix(int(h), s))
                cols = mint.matmul(mw, table)  # [W, S] @ [S(row a), S, E] -> [S(a), W, E]
                grid = mint.matmul(mh, cols.reshape(s, -1)).reshape(int(h), int(wd), e)  # [H, W, E]
                # [H, W, E] -> [H/m, m, W/m, m, E] -> [H/m, W/m, m, m, E] -> patch order
                grid = grid.reshape(int(h) // m, m, int(wd) // m, m, e).transpose(0, 2, 1, 3, 4).reshape(-1, e)
                cache[key] = grid
            grid = cache[key]
            out.extend([grid] * int(t))
        res = out[0] if len(out) == 1 else mint.cat(out, 0)
        return res.astype(w.dtype)


class VisionAttention(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.attention_bias, dtype)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, False, dtype)

    def construct(self, x, cos, sin, segments):
        n, h = x.shape[0], self.num_heads
        qkv = self.qkv(x).reshape(n, 3 * h, self.head_dim)  # [N, 3*E] -> [N, 3*H, D]: q heads, k heads, v heads
        # q and k rotated in one call (same angles per patch), in fp32 as the reference
        qk = ops.rotary_half(qkv[:, :2 * h], cos, sin, upcast=True)
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, 2 * h:]
        return self.proj(ops.vision_attention(q, k, v, segments, self.scale))


class VisionMLP(nn.Cell):
    def __init__(self, dim: int, inner: int, dtype):
        super().__init__()
        self.gate_proj = Linear(dim, inner, False, dtype)
        self.up_proj = Linear(dim, inner, False, dtype)
        self.down_proj = Linear(inner, dim, False, dtype)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = VisionAttention(cfg, dtype)
        # The block MLP's inner width is out_hidden_size (intermediate_size is the merger's).
        self.mlp = VisionMLP(cfg.hidden_size, cfg.out_hidden_size, dtype)

    def construct(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Cell):
    # torch.nn.LayerNorm(dim) in the reference: eps is its default 1e-5, not a config field.
    LAYER_NORM_EPS = 1e-5

    def __init__(self, dim: int, context_dim: int, dtype):
        super().__init__()
        self.proj = Linear(dim, dim, False, dtype)
        self.post_projection_norm = LayerNorm(dim, self.LAYER_NORM_EPS, dtype)
        self.gate_proj = Linear(dim, context_dim, False, dtype)
        self.up_proj = Linear(dim, context_dim, False, dtype)
        self.down_proj = Linear(context_dim, dim, False, dtype)

    def construct(self, x):
        x = ops.gelu_exact(self.post_projection_norm(self.proj(x)))
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


def cu_seqlens(grid_thw: np.ndarray) -> List[int]:
    """Segment bounds of the packed patch sequence: one segment of h*w patches per (item, temporal index)."""
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    lens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return [0] + np.cumsum(lens).astype(int).tolist()


class Glm4vVisionModel(nn.Cell):
    def __init__(self, cfg: VisionConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.embeddings = VisionEmbeddings(cfg, dtype)
        self.patch_embed = PatchEmbed(cfg, dtype)
        self.blocks = nn.CellList([VisionBlock(cfg, dtype) for _ in range(cfg.depth)])
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.downsample = PatchConv(cfg.out_hidden_size, cfg.hidden_size, (self.merge, self.merge), dtype)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size, dtype)

    @property
    def dtype(self):
        return self.post_layernorm.weight.dtype

    def check_inputs(self, pixel_values_shape, grid_thw: np.ndarray, what: str = "pixel_values") -> None:
        g = np.asarray(grid_thw)
        if g.ndim != 2 or g.shape[1] != 3 or g.shape[0] == 0:
            raise ValueError(f"{what} grid must have shape [num_items, 3] (t, h, w), got {g.shape}")
        if (g <= 0).any():
            raise ValueError(f"{what} grid has non-positive entries: {g.tolist()}")
        bad = g[(g[:, 1] % self.merge != 0) | (g[:, 2] % self.merge != 0)]
        if len(bad):
            raise ValueError(f"{what} grid rows {bad.tolist()}: h and w must be multiples of spatial_merge_size="
                             f"{self.merge}")
        n = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
        if tuple(pixel_values_shape) != (n, self.cfg.patch_dim):
            raise ValueError(f"{what} has shape {tuple(pixel_values_shape)} but its grid describes {n} patches of "
                             f"{self.cfg.patch_dim} values (expected [{n}, {self.cfg.patch_dim}])")

    def _run_blocks(self, x, cos, sin, segments):
        for blk in self.blocks:
            x = blk(x, cos, sin, segments)
        return x

    def construct(self, pixel_values, grid_thw, return_stages: bool = False, graph=False):
        """pixel_values: [sum(t*h*w), C*T*P*P]; grid_thw: host [items, 3] in patches (a video row (T, h, w) may be
        given as is: each temporal group is its own attention segment). ``graph``: run the block stack as a graph
        compiled per grid (or a callable ``graph(fn, what, *args)`` that runs the compiled ``fn`` on ``args``:
        engine.py passes one to time compiles). Returns merged features
        [sum(t*h*w) / merge^2, out_hidden], or (features, stages) with the intermediate hidden states."""
        grid = np.asarray(ops.to_numpy(grid_thw), dtype=np.int64).reshape(-1, 3)
        self.check_inputs(pixel_values.shape, grid)
        stages: Dict[str, object] = {}
        x = self.patch_embed(ops.to_tensor(pixel_values, self.dtype))
        x = self.post_conv_layernorm(x)
        stages["patch_embed"] = x
        x = x + self.embeddings.resampled(grid)
        stages["pos_embed"] = x
        hpos, wpos = patch_coords(grid, self.merge)
        cos, sin = vision_cos_sin(hpos, wpos, self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = Tensor(cos), Tensor(sin)
        segments = cu_seqlens(grid)
        if graph and not return_stages:
            if self.__dict__.get("_blocks_graph") is None:  # compiled per grid (segment bounds are constants)
                self.__dict__["_blocks_graph"] = ms.jit(self._run_blocks)
            fn, args = self.__dict__["_blocks_graph"], (x, cos, sin, tuple(segments))
            if callable(graph):  # the caller runs it (engine.py: times the compile of a new grid)
                what = "vision graph for grid " + ", ".join("x".join(str(int(v)) for v in row) for row in grid)
                x = graph(fn, what, *args)
            else:
                x = fn(*args)
        else:
            blocks = []
            for blk in self.blocks:
                x = blk(x, cos, sin, segments)
                blocks.append(x)
            stages["blocks"] = blocks
        x = self.post_layernorm(x)
        e = x.shape[-1]
        mm = self.merge * self.merge
        # [N, E] -> [N/mm, mm, E] -> [N/mm, E, mm] -> [N/mm, E*mm], flattened (c, i, j) like the conv kernel
        x = x.reshape(-1, mm, e).transpose(0, 2, 1).reshape(-1, e * mm)
        x = self.downsample(x)
        stages["downsample"] = x
        x = self.merger(x)
        stages["merger"] = x
        return (x, stages) if return_stages else x
