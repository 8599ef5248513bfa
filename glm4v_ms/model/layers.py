"""Parameter-holding cells whose attribute names equal the torch state-dict names (weight, bias).

Parameters are created lazily (MindSpore initializers), so building the 9B model allocates nothing until the
checkpoint's tensors are set by ``weights.load_weights``.
"""

from __future__ import annotations

from typing import Sequence

import mindspore as ms
from mindspore import Parameter, nn
from mindspore.common.initializer import initializer

from . import ops


def new_param(shape: Sequence[int], dtype, fill: str = "zeros") -> Parameter:
    return Parameter(initializer(fill, tuple(int(s) for s in shape), dtype), requires_grad=False)


class Linear(nn.Cell):
    """y = x W^T + b with W: [out, in] (torch layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = new_param((out_features, in_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None

    def construct(self, x):
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_param((dim,), dtype, "ones")

    def construct(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Cell):
    def __init__(self, dim: int, eps: float, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = new_param((dim,), dtype, "ones")
        self.bias = new_param((dim,), dtype)

    def construct(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(nn.Cell):
    def __init__(self, num: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = new_param((num, dim), dtype)

    def construct(self, ids):
        return ops.embedding(self.weight, ids)


class PatchConv(nn.Cell):
    """A convolution whose kernel equals its stride, stored in torch's conv layout [out, in, *kernel].

    Such a conv has no overlap, so on patches flattened in the kernel's (in, *kernel) order it is one linear layer:
    ``x @ W.reshape(out, -1)^T + b``. Used for the Conv3d patch embedding and the Conv2d 2x2 downsample.
    """

    def __init__(self, out_channels: int, in_channels: int, kernel: Sequence[int], dtype=ms.float32):
        super().__init__()
        self.out_channels = out_channels
        self.weight = new_param((out_channels, in_channels, *kernel), dtype)
        self.bias = new_param((out_channels,), dtype)

    def construct(self, patches):
        # patches: [N, in * prod(kernel)] flattened as (in, *kernel)
        return ops.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
