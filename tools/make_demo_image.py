#!/usr/bin/env python
"""Write a small synthetic test picture (a red square and a blue disc on white) and print its path."""
import os
import sys
import tempfile

from PIL import Image, ImageDraw


def main() -> int:
    path = os.path.join(tempfile.gettempdir(), "glm4v_ms_demo.png")
    img = Image.new("RGB", (320, 240), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([30, 40, 130, 140], fill=(220, 30, 30))
    d.ellipse([180, 80, 290, 190], fill=(30, 60, 220))
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
