"""The demo's synthetic world: scenes of coloured shapes whose true description is known.

Each scene has one or two shapes; a shape has a colour, a kind and a position. The
true caption names all of them ("a red circle on the left and a blue square on the
right"), so a constant caption cannot be right for many images, and the ground truth
of any text about an image can be checked.
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
           "yellow": (240, 210, 40), "purple": (150, 60, 180), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": 0.27, "center": 0.5, "right": 0.73}
BACKGROUND = (90, 90, 90)
BOILERPLATE = ("IMG_0423.jpg", "click here to buy", "", "free shipping on all orders", "DSC01234")
KINDS = ("clean", "swap", "attribute", "boilerplate")


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    position: str

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.colour} {self.kind} {where}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        return " and ".join(s.phrase() for s in self.shapes)

    def render(self, size: int = 64) -> Image.Image:
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        r = size // 6
        for shape in self.shapes:
            cx, cy = int(POSITIONS[shape.position] * size), size // 2
            box = (cx - r, cy - r, cx + r, cy + r)
            fill = COLOURS[shape.colour]
            if shape.kind == "circle":
                draw.ellipse(box, fill=fill)
            elif shape.kind == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        return img

    def jpeg(self, size: int = 64) -> bytes:
        buf = io.BytesIO()
        self.render(size).save(buf, format="JPEG", quality=92)
        return buf.getvalue()


def random_scene(rng: random.Random) -> Scene:
    if rng.random() < 0.5:
        return Scene((Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))),))
    left = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), "left")
    right = Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), "right")
    return Scene((left, right))


def change_attribute(scene: Scene, rng: random.Random) -> str:
    """The scene's caption with one attribute of one shape made false."""
    index = rng.randrange(len(scene.shapes))
    shape = scene.shapes[index]
    attribute = rng.choice(["colour", "kind"] + (["position"] if len(scene.shapes) == 1 else []))
    if attribute == "colour":
        new = Shape(rng.choice([c for c in COLOURS if c != shape.colour]), shape.kind, shape.position)
    elif attribute == "kind":
        new = Shape(shape.colour, rng.choice([k for k in SHAPES if k != shape.kind]), shape.position)
    else:
        new = Shape(shape.colour, shape.kind, rng.choice([p for p in POSITIONS if p != shape.position]))
    shapes = list(scene.shapes)
    shapes[index] = new
    return Scene(tuple(shapes)).caption()


def web_text(scene: Scene, other: Scene, kind: str, rng: random.Random) -> str:
    if kind == "swap":
        return other.caption()
    if kind == "attribute":
        return change_attribute(scene, rng)
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    return scene.caption()


_MENTION = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b")


def is_true_of(text: str, scene: Scene) -> bool:
    """Every (colour, shape) the text mentions is in the scene, and it mentions at least one."""
    mentions = _MENTION.findall(text.lower())
    present = {(s.colour, s.kind) for s in scene.shapes}
    return bool(mentions) and all(m in present for m in mentions)


def vocabulary() -> list[str]:
    words = {"a", "on", "the", "in", "and", *COLOURS, *SHAPES, *POSITIONS}
    for text in BOILERPLATE:
        words.update(re.findall(r"[a-z0-9]+", text.lower()))
    return sorted(words)
