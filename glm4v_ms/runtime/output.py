"""What GLM-4.1V's answers contain: ``<think>...</think><answer>...</answer>`` and grounding boxes.

Boxes are written as ``<|begin_of_box|>[x1,y1,x2,y2]<|end_of_box|>`` (or several ``[[...],[...]]`` in one span) with
coordinates normalised to 0-1000 of the image; ``rescale_boxes`` maps them to pixels of the original image.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
_SPAN = re.compile(re.escape(BOX_OPEN) + r"(.*?)" + re.escape(BOX_CLOSE), re.S)
_QUAD = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


@dataclass
class Box:
    x1: float
    y1: float
    x2: float
    y2: float

    def as_list(self) -> List[float]:
        return [self.x1, self.y1, self.x2, self.y2]


def split_thinking(text: str) -> Tuple[str, str]:
    """(thinking, answer) from a decoded reply. Tags are removed; a reply without <answer> is all answer once
    </think> has been seen (or when there is no <think> at all); an unterminated <think> is all thinking."""
    thinking = ""
    rest = text
    if "<think>" in rest or "</think>" in rest:
        before, _, after = rest.partition("<think>") if "<think>" in rest else ("", "", rest)
        body, closed, tail = after.partition("</think>")
        thinking = body.strip()
        rest = before + tail if closed else before
    answer = rest
    if "<answer>" in answer:
        answer = answer.split("<answer>", 1)[1]
    answer = answer.split("</answer>", 1)[0]
    return thinking, answer.strip()


def parse_boxes(text: str) -> List[Box]:
    """Every [x1, y1, x2, y2] inside a box span, in 0-1000 normalised coordinates, in order of appearance."""
    boxes = []
    for span in _SPAN.findall(text):
        for q in _QUAD.findall(span):
            boxes.append(Box(*(float(v) for v in q)))
    return boxes


def rescale_boxes(boxes: Sequence[Box], width: int, height: int) -> List[Box]:
    """0-1000 normalised -> pixel coordinates of a width x height image (clamped to the image)."""
    def sx(v):
        return min(max(v, 0.0), 1000.0) * width / 1000.0

    def sy(v):
        return min(max(v, 0.0), 1000.0) * height / 1000.0

    return [Box(round(sx(b.x1), 1), round(sy(b.y1), 1), round(sx(b.x2), 1), round(sy(b.y2), 1)) for b in boxes]


def draw_boxes(image, boxes: Sequence[Box], out_path: str, color: str = "red", width: Optional[int] = None) -> str:
    """Write ``image`` (PIL) with the pixel ``boxes`` drawn to ``out_path`` (atomically: temp file, then rename)."""
    from PIL import ImageDraw

    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    w = width or max(2, round(min(img.size) / 200))
    for b in boxes:
        draw.rectangle([min(b.x1, b.x2), min(b.y1, b.y2), max(b.x1, b.x2), max(b.y1, b.y2)], outline=color, width=w)
    out_path = os.path.abspath(out_path)
    ext = os.path.splitext(out_path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".boxes-", suffix=ext, dir=os.path.dirname(out_path))
    os.close(fd)
    try:
        img.save(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out_path
