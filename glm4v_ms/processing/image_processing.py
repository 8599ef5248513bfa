"""GLM-4.1V image preprocessing in numpy + PIL (spec 6.1), equal to transformers 4.57's slow ``Glm4vImageProcessor``.

An image becomes ``grid_t * grid_h * grid_w`` rows of ``3 * 2 * 14 * 14 = 1176`` floats:
smart_resize -> RGB -> PIL bicubic resize of the uint8 image -> rescale 1/255 -> normalise (CLIP mean/std)
-> repeat to 2 temporal frames -> patch flattening in merge-block order.

Deliberate differences from 4.57 (each pinned by a test):
* images smaller than 28 px are scaled up (transformers 5.x rule) instead of raising;
* 16-bit ("I;16*", "I") images keep their top 8 bits; 4.57's ``convert("RGB")`` clips them to 255 (nearly white);
* EXIF orientation is applied to PIL images passed in too (see media.load_image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from .media import AspectRatioError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass
class ImageProcessorConfig:
    """Image preprocessing settings; ``from_dict`` reads a ``preprocessor_config.json``.

    min_pixels / max_pixels bound t*h*w of the resized input (HF stores them as ``size.shortest_edge`` /
    ``size.longest_edge``, which despite the names are pixel counts). Defaults are the class defaults of
    transformers (max 28*28*15000); the hub file of GLM-4.1V-9B-Thinking sets max 9,633,792.
    RGB conversion is always done: the vision tower takes 3 channels.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    image_mean: Tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Side of one merged token in pixels (14 * 2 = 28)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: Dict, name: str = "preprocessor config"):
        """Known keys from ``d``; unknown keys (processor_class, image_processor_type, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, dict) or "shortest_edge" not in size or "longest_edge" not in size:
                raise ValueError(f"{name}: 'size' must be {{'shortest_edge': min_pixels, 'longest_edge': "
                                 f"max_pixels}}, got {size!r}")
            kwargs.setdefault("min_pixels", size["shortest_edge"])
            kwargs.setdefault("max_pixels", size["longest_edge"])
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
        config = cls(**kwargs)
        config.validate(name)
        return config

    def validate(self, name: str = "preprocessor config") -> None:
        for key in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"{name}: {key} must be positive, got {getattr(self, key)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"{name}: min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"{name}: image_mean and image_std need 3 values (RGB)")


def smart_resize(num_frames: int, height: int, width: int, *, temporal_factor: int = 2, factor: int = 28,
                 min_pixels: int = 112 * 112, max_pixels: int = 28 * 28 * 15000,
                 source: str = "image") -> Tuple[int, int]:
    """Target (height, width), multiples of ``factor``, with t*h*w inside [min_pixels, max_pixels] and the aspect
    ratio kept as well as rounding allows.

    Steps (spec 6.1; Python ``round`` is banker's rounding, round(2.5) == 2):
    1. Tiny inputs: if a side is below ``factor``, scale both sides by max(factor/H, factor/W) and truncate to int
       (transformers 5.x; 4.57 raises "height or width must be larger than factor" here instead).
    2. An aspect ratio above 200 raises ``AspectRatioError`` (all versions).
    3. h = round(H/f)*f, w = round(W/f)*f, t = round(T/tf)*tf.
    4. If t*h*w > max_pixels: beta = sqrt(T*H*W / max_pixels), h = max(f, floor(H/beta/f)*f), same for w.
       Else if t*h*w < min_pixels: beta = sqrt(min_pixels / (T*H*W)), h = ceil(H*beta/f)*f, same for w.

    Worked examples (T = 2, f = 28, min 12544, max 9,633,792):
    * 480x640: h = round(17.14)*28 = 476, w = round(22.86)*28 = 644; 2*476*644 = 613,088 is inside -> 476x644
      (34x46 patches, 391 tokens).
    * 3000x4000: 2*2996*4004 > max, beta = sqrt(24e6/9633792) = 1.578; h = floor(67.9)*28 = 1876,
      w = floor(90.5)*28 = 2520.
    * 15x53 (tiny): scale 28/15 -> 28x98; h = 28, w = round(3.5)*28 = 112; 2*28*112 = 6272 < min, so
      beta = sqrt(12544/5488) = 1.512, h = ceil(1.512)*28 = 56, w = ceil(5.29)*28 = 168 -> 56x168.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"{source}: smart_resize needs at least {temporal_factor} frames, got {num_frames}")
    if height <= 0 or width <= 0:
        raise ValueError(f"{source}: image has zero size {height}x{width}")
    given = f"{height}x{width}"
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise AspectRatioError(source, f"aspect ratio {ratio:.1f} of {given} (HxW) exceeds {MAX_ASPECT_RATIO}",
                               "crop or pad the image to a less extreme shape")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' ``convert_to_rgb`` makes it (``Image.convert("RGB")``), except for 16-bit images.

    * RGBA / LA / PA: alpha is dropped, not composited (that is what PIL's convert and HF do), so transparent
      pixels show whatever colour they store.
    * P (palette), L, 1, CMYK, YCbCr: PIL's conversion.
    * I;16 and I: PIL would clip values above 255 (a 16-bit scan turns white); we keep the top 8 bits
      (value >> 8), i.e. treat the data as 0..65535.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return image.convert("RGB")


def rescale_and_normalize(pixels: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """[..., 3] uint8 -> float32 the way transformers' slow processor computes it (bit for bit).

    Rescale in float64 then cast to float32; normalise in float32 with float32 mean and std.
    """
    x = pixels
    if config.do_rescale:
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
    x = x.astype(np.float32, copy=False)
    if config.do_normalize:
        x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    return x


def resize_frame(image: Image.Image, height: int, width: int, config: ImageProcessorConfig) -> np.ndarray:
    """PIL resize of an RGB image (PIL's bicubic is antialiased when shrinking); returns [H, W, 3] uint8."""
    if config.do_resize and (image.height, image.width) != (height, width):
        image = image.resize((width, height), resample=config.resample)
    return np.asarray(image)


def patchify(frames: np.ndarray, config: ImageProcessorConfig) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """[T, C, H, W] float32 (T a multiple of temporal_patch_size) -> ([t*h*w, C*tp*p*p], (t, h, w)).

    Rows go by temporal group, then merge block (row, col), then position inside the 2x2 block, so every 4
    consecutive rows are one merged token. Inside a row, the element index is ((c*tp + t)*p + y)*p + x.
    """
    tp, p, m = config.temporal_patch_size, config.patch_size, config.merge_size
    num_frames, channels, height, width = frames.shape
    if num_frames % tp or height % (p * m) or width % (p * m):
        raise ValueError(f"patchify needs T % {tp} == 0 and H, W multiples of {p * m}, got {frames.shape}")
    grid_t, grid_h, grid_w = num_frames // tp, height // p, width // p
    # [T, C, H, W] -> [gt, tp, C, gh/m, m, p, gw/m, m, p]
    x = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
    # -> [gt, gh/m, gw/m, m(row), m(col), C, tp, p(y), p(x)]
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    # -> [gt*gh*gw, C*tp*p*p]
    return x.reshape(grid_t * grid_h * grid_w, channels * tp * p * p), (grid_t, grid_h, grid_w)


def pad_temporal(frames: np.ndarray, temporal_patch_size: int) -> np.ndarray:
    """Repeat the last frame until T is a multiple of temporal_patch_size ([T, ...] -> [T', ...])."""
    remainder = frames.shape[0] % temporal_patch_size
    if remainder == 0:
        return frames
    repeats = np.repeat(frames[-1:], temporal_patch_size - remainder, axis=0)
    return np.concatenate([frames, repeats], axis=0)


def preprocess_image(image: Image.Image, config: ImageProcessorConfig,
                     source: str = "image") -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """One PIL image -> (patches [grid_h*grid_w, 1176] float32, (1, grid_h, grid_w))."""
    image = to_rgb(image)
    height, width = image.height, image.width
    if config.do_resize:
        height, width = smart_resize(config.temporal_patch_size, height, width,
                                     temporal_factor=config.temporal_patch_size, factor=config.factor,
                                     min_pixels=config.min_pixels, max_pixels=config.max_pixels, source=source)
    pixels = rescale_and_normalize(resize_frame(image, height, width, config), config)  # [H, W, 3]
    frames = pad_temporal(pixels.transpose(2, 0, 1)[None], config.temporal_patch_size)  # [tp, 3, H, W]
    return patchify(frames, config)


def preprocess_images(images: Sequence[Image.Image], config: ImageProcessorConfig,
                      sources: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Images -> {"pixel_values": [sum of patches, 1176] float32, "image_grid_thw": [n, 3] int64}."""
    patches: List[np.ndarray] = []
    grids: List[Tuple[int, int, int]] = []
    for k, image in enumerate(images):
        rows, grid = preprocess_image(image, config, sources[k] if k < len(sources) else f"image {k}")
        patches.append(rows)
        grids.append(grid)
    row_width = 3 * config.temporal_patch_size * config.patch_size ** 2
    pixel_values = np.concatenate(patches, axis=0) if patches else np.zeros((0, row_width), np.float32)
    return {"pixel_values": pixel_values.astype(np.float32, copy=False),
            "image_grid_thw": np.asarray(grids, dtype=np.int64).reshape(-1, 3)}
