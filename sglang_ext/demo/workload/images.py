"""Synthetic pictures of the reference workload's image domain: shapes or a seven-segment digit, one colour."""
from __future__ import annotations

import random
from dataclasses import dataclass

from sglang_ext.demo.prompts import COLOURS

IMAGE_SIZE = 128                       # pixels; tiny_models' processor keeps 128x128 -> 16 image tokens
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "A", 2: "Two", 3: "Three"}
EVAL_IMAGE_SEED_OFFSET = 1_000_000_000     # eval image seeds live far away from training seeds


def _draw_seven_segment(draw, digit: int, x0: int, y0: int, w: int, h: int, thick: int, colour) -> None:
    segments = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
                8: "abcdefg", 9: "abcdfg"}[digit]
    half = h // 2
    boxes = {"a": (x0, y0, x0 + w, y0 + thick), "g": (x0, y0 + half - thick // 2, x0 + w, y0 + half + thick // 2),
             "d": (x0, y0 + h - thick, x0 + w, y0 + h), "f": (x0, y0, x0 + thick, y0 + half),
             "b": (x0 + w - thick, y0, x0 + w, y0 + half), "e": (x0, y0 + half, x0 + thick, y0 + h),
             "c": (x0 + w - thick, y0 + half, x0 + w, y0 + h)}
    for s in segments:
        draw.rectangle(boxes[s], fill=colour)


@dataclass(frozen=True)
class ImageSpec:
    """What a synthetic picture shows; `caption` is the target's answer."""
    colour: str
    shape: str | None                  # None for a digit
    count: int                         # 1 for a digit
    digit: int | None = None

    @property
    def caption(self) -> str:
        if self.digit is not None:
            return f"The digit {self.digit}, in {self.colour}."
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}."


def render_image(seed: int):
    """(128x128 PIL image, ImageSpec) for an image seed: 1-3 same-colour shapes, or a seven-segment digit."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colour = rng.choice(sorted(COLOURS))
    rgb = COLOURS[colour]
    if rng.random() < 0.3:
        digit = rng.randrange(10)
        w, h = rng.randint(40, 56), rng.randint(72, 96)
        x0, y0 = rng.randint(4, IMAGE_SIZE - w - 4), rng.randint(4, IMAGE_SIZE - h - 4)
        _draw_seven_segment(draw, digit, x0, y0, w, h, rng.randint(8, 12), rgb)
        return image, ImageSpec(colour, None, 1, digit)
    shape, count = rng.choice(SHAPES), rng.randint(1, 3)
    cell = IMAGE_SIZE // 2
    for cx, cy in rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], count):   # distinct quadrants: no overlap
        size = rng.randint(30, 50)
        x0 = cx * cell + rng.randint(4, cell - size - 4)
        y0 = cy * cell + rng.randint(4, cell - size - 4)
        box = [x0, y0, x0 + size, y0 + size]
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(x0 + size / 2, y0), (x0 + size, y0 + size), (x0, y0 + size)], fill=rgb)
    return image, ImageSpec(colour, shape, count)
