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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mask.datasets.records import DatasetTables, join_uri

logger = logging.getLogger(__name__)

DEMO_FORMAT_VERSION = 1
_MARKER = "demo_world.json"

# Object classes: name → width / height of the drawn shape.
OBJECT_ASPECT: dict[str, float] = {
    "ball": 1.0, "box": 1.05, "tree": 0.75, "house": 0.95, "car": 1.8, "flower": 0.65, "kite": 0.75,
    "fish": 1.7, "umbrella": 1.15, "bottle": 0.45, "boat": 1.0,
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (208, 32, 36), "blue": (36, 72, 206), "green": (34, 150, 52), "yellow": (240, 210, 30),
    "orange": (242, 128, 20), "purple": (128, 44, 166), "white": (245, 245, 245), "black": (22, 22, 22),
    "pink": (240, 120, 180),
}
SIZES = ("large", "small")
TEXTURES = ("striped", "dotted", "plain")
# Synonyms used only in gallery captions: absent from the VG-side words, present in GloVe 6B.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "ball": ("sphere", "orb"), "box": ("crate", "carton"), "tree": ("pine", "oak"),
    "house": ("cottage", "home"), "car": ("automobile", "sedan"), "flower": ("blossom", "bloom"),
    "kite": ("glider",), "fish": ("trout", "salmon"), "umbrella": ("parasol", "canopy"),
    "bottle": ("jar", "flask"), "boat": ("sailboat", "vessel"),
    "red": ("crimson", "scarlet"), "blue": ("azure", "navy"), "green": ("emerald",),
    "yellow": ("golden", "lemon"), "orange": ("tangerine",), "purple": ("violet", "lavender"),
    "white": ("ivory",), "black": ("ebony",), "pink": ("magenta",),
    "large": ("big", "huge"), "small": ("tiny", "little"),
    "striped": ("banded",), "dotted": ("spotted", "speckled"), "plain": ("solid",),
}
# Probability that a caption noun / adjective is replaced by one of its synonyms.
SYNONYM_RATE = 1.0 / 3.0
# Background gradients (top, bottom), muted so the saturated objects stand out.
_BACKGROUNDS = (
    ((150, 180, 205), (120, 150, 110)), ((200, 190, 170), (160, 140, 115)), ((170, 170, 175), (120, 120, 125)),
    ((120, 140, 160), (80, 95, 110)), ((185, 200, 185), (140, 160, 135)), ((210, 200, 215), (170, 160, 180)),
    ((95, 100, 115), (140, 135, 120)), ((205, 185, 160), (190, 150, 120)),
)
_TRUNK = (110, 72, 40)
_DARK = (40, 40, 45)
_LIGHT = (225, 235, 245)
# Caption frames; each caption of an image uses a different one.
_FRAMES = ("{x}.", "a photo of {x}.", "there is {x} in this picture.", "an image showing {x}.",
           "{x} in the scene.", "a picture with {x}.", "we can see {x} here.")


def vg_words() -> tuple[str, ...]:
    """Every word the VG-side annotations use (object names, colours, sizes, textures), sorted."""
    return tuple(sorted({*OBJECT_ASPECT, *COLOURS, *SIZES, *TEXTURES}))


def synonym_words() -> tuple[str, ...]:
    """Every synonym the gallery captions may use instead of a VG-side word, sorted."""
    return tuple(sorted({s for syns in SYNONYMS.values() for s in syns}))


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
    """2–4 objects of distinct classes with attributes and non-overlapping boxes."""
    classes = sorted(OBJECT_ASPECT)
    n = int(rng.integers(2, 5))
    chosen = [classes[i] for i in rng.permutation(len(classes))[:n]]
    objects: list[DemoObject] = []
    for name in chosen:
        colour = sorted(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = "large" if rng.random() < 0.4 else "small"
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        for attempt in range(60):
            if attempt == 30:
                size = "small"  # a large object that does not fit is made small
            frac = rng.uniform(0.36, 0.46) if size == "large" else rng.uniform(0.17, 0.25)
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
    else:  # plain: a soft vertical shading only
        arr = np.asarray(img, dtype=np.float32)
        arr *= np.linspace(1.08, 0.9, h, dtype=np.float32)[:, None, None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def _draw_object(canvas: Image.Image, obj: DemoObject) -> None:
    """Draw one object: its shape filled with colour + texture, then fixed-colour details."""
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    mask = Image.new("L", (w, h), 0)
    m = ImageDraw.Draw(mask)
    details: list[tuple[str, Any, dict]] = []

    def P(fx: float, fy: float) -> tuple[float, float]:
        return (fx * (w - 1), fy * (h - 1))

    n = obj.name
    if n == "ball":
        m.ellipse([P(0, 0), P(1, 1)], fill=255)
        details.append(("arc", [P(0.15, 0.15), P(0.85, 0.85)], {"start": 200, "end": 340, "width": 2}))
    elif n == "box":
        m.rectangle([P(0, 0.2), P(0.8, 1)], fill=255)
        m.polygon([P(0, 0.2), P(0.2, 0), P(1, 0), P(0.8, 0.2)], fill=255)
        m.polygon([P(0.8, 0.2), P(1, 0), P(1, 0.8), P(0.8, 1)], fill=255)
        details.append(("line", [P(0, 0.2), P(0.8, 0.2), P(1, 0)], {"width": 2}))
        details.append(("line", [P(0.8, 0.2), P(0.8, 1)], {"width": 2}))
    elif n == "tree":
        m.ellipse([P(0, 0), P(1, 0.72)], fill=255)
        details.append(("rectangle", [P(0.42, 0.66), P(0.58, 1)], {"fill": _TRUNK}))
    elif n == "house":
        m.rectangle([P(0.1, 0.45), P(0.9, 1)], fill=255)
        m.polygon([P(0, 0.48), P(0.5, 0), P(1, 0.48)], fill=255)
        details.append(("rectangle", [P(0.42, 0.7), P(0.58, 1)], {"fill": _DARK}))
        details.append(("rectangle", [P(0.18, 0.58), P(0.34, 0.72)], {"fill": _LIGHT}))
        details.append(("rectangle", [P(0.66, 0.58), P(0.82, 0.72)], {"fill": _LIGHT}))
    elif n == "car":
        m.rounded_rectangle([P(0, 0.38), P(1, 0.8)], radius=max(1, h // 8), fill=255)
        m.polygon([P(0.2, 0.4), P(0.32, 0.06), P(0.7, 0.06), P(0.84, 0.4)], fill=255)
        details.append(("polygon", [P(0.27, 0.38), P(0.36, 0.14), P(0.66, 0.14), P(0.76, 0.38)],
                        {"fill": _LIGHT}))
        r = min(0.2 * h, 0.11 * w)
        for fx in (0.24, 0.76):
            cx, cy = fx * (w - 1), h - 1 - r
            details.append(("ellipse", [(cx - r, cy - r), (cx + r, cy + r)], {"fill": _DARK}))
    elif n == "flower":
        cx, cy, d, r = 0.5 * (w - 1), 0.33 * (h - 1), 0.27 * w, 0.22 * w
        for k in range(6):
            a = k * math.pi / 3
            px, py = cx + d * math.cos(a), cy + d * math.sin(a)
            m.ellipse([(px - r, py - r), (px + r, py + r)], fill=255)
        details.append(("line", [P(0.5, 0.5), P(0.5, 1)], {"fill": COLOURS["green"], "width": max(2, w // 14)}))
        core = (120, 70, 20) if obj.colour in ("yellow", "orange") else (245, 200, 40)
        rc = 0.14 * w
        details.append(("ellipse", [(cx - rc, cy - rc), (cx + rc, cy + rc)], {"fill": core}))
    elif n == "kite":
        m.polygon([P(0.5, 0), P(1, 0.34), P(0.5, 0.76), P(0, 0.34)], fill=255)
        details.append(("line", [P(0.5, 0), P(0.5, 0.76)], {"fill": _DARK, "width": 1}))
        details.append(("line", [P(0, 0.34), P(1, 0.34)], {"fill": _DARK, "width": 1}))
        details.append(("line", [P(0.5, 0.76), P(0.42, 0.84), P(0.56, 0.92), P(0.48, 1)],
                        {"fill": _DARK, "width": 2}))
    elif n == "fish":
        m.ellipse([P(0, 0.12), P(0.76, 0.88)], fill=255)
        m.polygon([P(0.64, 0.5), P(1, 0), P(1, 1)], fill=255)
        r = 0.06 * w
        details.append(("ellipse", [(0.17 * w - r, 0.4 * h - r), (0.17 * w + r, 0.4 * h + r)], {"fill": _DARK}))
    elif n == "umbrella":
        m.pieslice([P(0, 0), P(1, 1.1)], start=180, end=360, fill=255)
        details.append(("line", [P(0.5, 0.52), P(0.5, 0.9)], {"fill": _DARK, "width": max(2, w // 20)}))
        details.append(("arc", [P(0.36, 0.8), P(0.5, 1)], {"start": 0, "end": 180, "fill": _DARK,
                                                          "width": max(2, w // 20)}))
    elif n == "bottle":
        m.rounded_rectangle([P(0, 0.35), P(1, 1)], radius=max(1, w // 6), fill=255)
        m.polygon([P(0, 0.36), P(0.3, 0.18), P(0.7, 0.18), P(1, 0.36)], fill=255)
        m.rectangle([P(0.3, 0.04), P(0.7, 0.2)], fill=255)
        details.append(("rectangle", [P(0.27, 0), P(0.73, 0.08)], {"fill": _DARK}))
    elif n == "boat":
        m.polygon([P(0, 0.64), P(1, 0.64), P(0.8, 1), P(0.2, 1)], fill=255)
        m.polygon([P(0.53, 0.02), P(0.53, 0.58), P(0.92, 0.58)], fill=255)
        m.polygon([P(0.47, 0.1), P(0.47, 0.58), P(0.12, 0.58)], fill=255)
        details.append(("line", [P(0.5, 0), P(0.5, 0.64)], {"fill": _DARK, "width": max(2, w // 30)}))
    else:  # pragma: no cover - OBJECT_ASPECT and this function list the same classes
        raise ValueError(f"no drawing for object class {n!r}")
    patch = _texture((w, h), COLOURS[obj.colour], obj.texture)
    canvas.paste(patch, (x0, y0), mask)
    d = ImageDraw.Draw(canvas)
    edge = _shade(COLOURS[obj.colour])
    for kind, xy, kw in details:
        pts = [(x0 + px, y0 + py) for px, py in xy]
        kw = dict(kw)
        kw.setdefault("fill", edge)
        getattr(d, kind)(pts, **kw)


def render_scene(rng: np.random.Generator, objects: list[DemoObject], image_size: int) -> Image.Image:
    """The RGB image of a scene: gradient background, objects (largest first), pixel noise."""
    top, bottom = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    jitter = rng.integers(-15, 16, size=3)
    t = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None, None]
    bg = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32) + jitter
    bg = np.broadcast_to(bg, (image_size, image_size, 3))
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    for obj in sorted(objects, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1])):
        _draw_object(canvas, obj)
    arr = np.asarray(canvas, dtype=np.float32)
    arr += rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


# --------------------------------------------------------------------------- captions

def _maybe_synonym(word: str, rng: np.random.Generator, counts: dict[str, int]) -> str:
    counts["words"] += 1
    syns = SYNONYMS.get(word)
    if syns and rng.random() < SYNONYM_RATE:
        counts["replaced"] += 1
        return syns[int(rng.integers(len(syns)))]
    return word


def _phrase(obj: DemoObject, rng: np.random.Generator, counts: dict[str, int]) -> str:
    """``a small striped red ball`` with some attributes left out and some words replaced."""
    words = []
    if rng.random() < 0.5:
        words.append(obj.size)
    if rng.random() < 0.4:
        words.append(obj.texture)
    if rng.random() < 0.85:
        words.append(obj.colour)
    words.append(obj.name)
    words = [_maybe_synonym(w, rng, counts) for w in words]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def make_captions(objects: list[DemoObject], rng: np.random.Generator, n: int = 5,
                  counts: dict[str, int] | None = None) -> list[str]:
    """``n`` captions of a scene, each with a different frame, each describing 1–3 objects."""
    counts = counts if counts is not None else {"words": 0, "replaced": 0}
    frames = [_FRAMES[i] for i in rng.permutation(len(_FRAMES))[:n]]
    out = []
    for frame in frames:
        k = int(rng.integers(1, min(3, len(objects)) + 1))
        chosen = [objects[i] for i in sorted(rng.permutation(len(objects))[:k])]
        phrases = [_phrase(o, rng, counts) for o in chosen]
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
        text = frame.format(x=body)
        out.append(text[0].upper() + text[1:])
    return out


def _tokens(text: str) -> list[str]:
    return "".join(c if c.isalpha() else " " for c in text.lower()).split()


# --------------------------------------------------------------------------- the world on disk

def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=False) + "\n", encoding="utf-8")


def _params(seed: int, n_train: int, n_gallery: int, image_size: int) -> dict[str, int]:
    return {"version": DEMO_FORMAT_VERSION, "seed": seed, "n_train": n_train, "n_gallery": n_gallery,
            "image_size": image_size}


def generate_demo_world(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 240, n_gallery: int = 100,
                        image_size: int = 256, overwrite: bool = False) -> DemoWorld:
    """Write the demo world (VG training split + Karpathy gallery) under ``out_dir``.

    Args:
        out_dir: local folder (created); ``vg/`` and ``karpathy/`` go inside.
        seed: everything is a function of it.
        n_train: VG training images.
        n_gallery: gallery images (5 captions each).
        image_size: side of the square images in pixels (≥ 64).
        overwrite: regenerate even if a complete world with these parameters exists.

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
    params = _params(seed, n_train, n_gallery, image_size)
    if not overwrite and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("params") == params:
                logger.info("demo world at %s is complete; reused", root)
                return world
        except (json.JSONDecodeError, OSError):
            pass
    if marker.exists():
        marker.unlink()
    world.vg_images.mkdir(parents=True, exist_ok=True)
    (world.karpathy_root / "images").mkdir(parents=True, exist_ok=True)

    image_data, objects_json, attributes_json = [], [], []
    object_id = 1
    for i in range(n_train):
        rng = np.random.default_rng([seed, 0, i])
        scene = sample_scene(rng, image_size)
        image_id = i + 1
        (world.vg_images / f"{image_id}.jpg").write_bytes(_jpeg(render_scene(rng, scene, image_size)))
        image_data.append({"width": image_size, "url": f"images/{image_id}.jpg", "height": image_size,
                           "image_id": image_id, "coco_id": None, "flickr_id": None})
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
        objects_json.append({"image_id": image_id, "objects": objs})
        attributes_json.append({"image_id": image_id, "attributes": attrs})
    _dump(world.vg_dir / "image_data.json", image_data)
    _dump(world.vg_dir / "objects.json", objects_json)
    _dump(world.vg_dir / "attributes.json", attributes_json)

    counts = {"words": 0, "replaced": 0}
    records, sentid = [], 0
    for i in range(n_gallery):
        rng = np.random.default_rng([seed, 1, i])
        scene = sample_scene(rng, image_size)
        filename = f"demo_{i:05d}.jpg"
        (world.karpathy_root / "images" / filename).write_bytes(_jpeg(render_scene(rng, scene, image_size)))
        caps = make_captions(scene, rng, 5, counts)
        sents = [{"tokens": _tokens(c), "raw": c, "imgid": i, "sentid": sentid + k} for k, c in enumerate(caps)]
        records.append({"filepath": "images", "sentids": [s["sentid"] for s in sents], "filename": filename,
                        "imgid": i, "split": "test", "sentences": sents})
        sentid += len(sents)
    _dump(world.karpathy_json, {"images": records, "dataset": "demo"})
    _dump(marker, {"params": params, "synonym_rate": round(counts["replaced"] / max(1, counts["words"]), 4),
                   "vg_words": list(vg_words()), "synonyms": {k: list(v) for k, v in SYNONYMS.items()}})
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
