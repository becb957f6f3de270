"""Prompts and synthetic images shared by tests, the demo and benchmarks."""
from __future__ import annotations

import random

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

TEXT_PROMPTS = [
    "def main(args):",
    "The quick brown fox",
    "import os\nimport sys",
    "Write a haiku about the sea.",
    "class Stack:\n    def push(self, item):",
    "Explain what a decorator is in Python.",
]
IMAGE_QUESTIONS = ["What colour is the shape?", "How many shapes are there?"]

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 60, 180), "orange": (240, 140, 30)}


SYSTEM_PROMPT = ("You are a concise assistant for Python code. Continue the user's code or answer the question "
                 "in a few lines, in the style of the standard library.")


def system_turn(text: str = SYSTEM_PROMPT) -> str:
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def chat_prompt(user_text: str, n_images: int = 0) -> str:
    """The tiny models' chat format, with one image placeholder per image before the text."""
    return f"<|im_start|>user\n{IMAGE_PLACEHOLDER * n_images}{user_text}<|im_end|>\n<|im_start|>assistant\n"


def make_image(seed: int, size: tuple[int, int] = (96, 64)):
    """A few coloured rectangles/ellipses on a white background, deterministic in `seed`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        x0, y0 = rng.randint(0, size[0] // 2), rng.randint(0, size[1] // 2)
        x1, y1 = x0 + rng.randint(10, size[0] // 2), y0 + rng.randint(10, size[1] // 2)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=colour)
    return image


def mixed_requests(n_text: int = 6, n_image: int = 2) -> list[tuple[str, list]]:
    """(prompt, images) pairs: text prompts first, then one-image prompts."""
    reqs = [(chat_prompt(t), []) for t in (TEXT_PROMPTS * 4)[:n_text]]
    reqs += [(chat_prompt(IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)], 1), [make_image(i)]) for i in range(n_image)]
    return reqs
