"""A synthetic dataset in the PASCAL VOC layout, for tests, demos and CPU-sized searches.

Every class has its own shape and colour/texture; images hold 1-3 objects on textured backgrounds with
clutter. Three classes come with a *co-occurrence trap* (DESIGN.md §4): a "boat" may sit on a water
band, a "train" on rails, a "car" on a road, each labelled background. How often the context appears
with its class (``cooccur``) decides whether EPS can separate them: ~0.4 works, ~1.0 (preset ``hard``)
is where EPS files the class under background. Saliency maps are the blurred true foreground with
controlled errors: objects missed, salient background blobs, jittered boundaries.

Output (same as real VOC, so every reader and stage runs unchanged)::

    JPEGImages/<id>.jpg  SegmentationClassAug/<id>.png  SaliencyMaps/<id>.png  Annotations/<id>.xml
    cls_labels.npy  class_names.txt  ImageSets/Segmentation/{train_aug,train,val}.txt  synth.json

``train`` (the ground-truth split on which pseudo masks are scored) is a subset of ``train_aug``;
``val`` is separate. Output is byte-identical for a seed; each image has its own generator seeded by
``(seed, split, index)``, so changing one split's size leaves the other split's images unchanged.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image
from scipy.ndimage import gaussian_filter

from wsss_tune.data.masks import encode_mask_png
from wsss_tune.data.voc import (
    ANNOTATION_DIR,
    CLASS_NAMES_FILE,
    CLS_LABELS_FILE,
    IGNORE_INDEX,
    IMAGE_EXT,
    MASK_EXT,
    SALIENCY_EXT,
    SPLIT_DIR,
    DataError,
)
from wsss_tune.utils.io import atomic_dir

__all__ = [
    "SYNTH_PRESETS",
    "SYNTH_CLASSES",
    "SynthSettings",
    "SynthImage",
    "generate_synthetic_voc",
    "render_image",
]

#: Bump when the drawing changes, so an existing folder made by an older generator is rebuilt.
GENERATOR_VERSION = 1
#: Settings file written last: its presence with matching settings marks a complete folder.
SETTINGS_FILE = "synth.json"

#: Named settings. ``default`` is the DESIGN.md §4 prototype (96x96, 5 classes, 600 train images,
#: co-occurrence 0.4); ``hard`` makes every trap context always present; ``tiny`` is for unit tests.
SYNTH_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"n_train": 600, "n_mask_eval": 200, "n_val": 200, "image_size": 96, "num_classes": 5,
                "cooccur": 0.4},
    "hard": {"n_train": 600, "n_mask_eval": 200, "n_val": 200, "image_size": 96, "num_classes": 5,
             "cooccur": 1.0},
    "tiny": {"n_train": 24, "n_mask_eval": 8, "n_val": 8, "image_size": 64, "num_classes": 5, "cooccur": 0.4},
}

# --- drawing constants (DESIGN.md §4 prototype unless noted) --------------------------------------
#: Objects per image, inclusive.
OBJECTS_PER_IMAGE = (1, 3)
#: Background clutter ellipses per image, inclusive.
CLUTTER_PER_IMAGE = (0, 4)
#: Object "radius" as a fraction of the image side (our choice: objects cover ~3-15 % of the image).
OBJECT_RADIUS = (0.12, 0.22)
#: Clutter ellipse semi-axes as a fraction of the image side (our choice).
CLUTTER_RADIUS = (0.04, 0.12)
#: A new object may overlap earlier ones by at most this fraction of its own area (keeps every
#: object visible); placement is retried this many times before the object is dropped.
MAX_OVERLAP = 0.3
PLACEMENT_TRIES = 10
#: Random in-plane rotation of the symmetric shapes, radians (our choice).
MAX_ROTATION = 0.5
#: Per-instance colour offset, and amplitude of a class's texture, in 8-bit levels (our choice).
INSTANCE_COLOUR_JITTER = 25
TEXTURE_AMPLITUDE = 30.0
#: Gaussian pixel noise over the whole image, 8-bit levels.
PIXEL_NOISE_STD = 6.0
#: Saliency = blurred foreground (sigma 1.5), each object missed with p 0.1, a salient background
#: blob with p 0.1 (prototype); boundaries jittered by thresholding the lightly blurred foreground
#: plus smooth noise of this amplitude and smoothness, and scaled by a per-image confidence (our choice).
SALIENCY_BLUR_SIGMA = 1.5
SALIENCY_MISS_PROB = 0.1
SALIENCY_FAKE_BLOB_PROB = 0.1
BOUNDARY_NOISE_AMPLITUDE = 0.2
BOUNDARY_NOISE_SIGMA = 2.0
BOUNDARY_PRE_BLUR_SIGMA = 1.0
#: The noise acts only where the lightly blurred foreground lies strictly inside this range, i.e. near
#: object boundaries (no speckles on the background, no holes inside objects).
BOUNDARY_ZONE = (0.02, 0.98)
SALIENCY_CONFIDENCE = (0.8, 1.0)
#: An object whose visible part is less than this fraction of its drawn area is marked 'difficult'
#: in the XML (it still counts as present, as in the VOC label files).
DIFFICULT_VISIBLE_FRACTION = 0.5
#: JPEG quality of the images (our choice; PIL's default is 75).
JPEG_QUALITY = 90
#: Generator streams per split (so splits are independent).
_SPLIT_STREAM = {"train_aug": 0, "val": 1}


# --------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------

# A shape maps object-centred coordinates (u, v) in units of the radius (v grows downwards) to
# (inside, accent): accent pixels get the class's second colour (a sail, windows).
_Shape = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def _disc(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    return u * u + v * v <= 1.0, None


def _square(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85), None


def _cross(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)), None


def _boat(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hull = (v >= 0.0) & (v <= 0.45) & (np.abs(u) <= 1.0 - 0.8 * v)
    sail = (v >= -1.0) & (v < 0.0) & (u >= 0.05) & (u <= 0.05 + 0.7 * (v + 1.0))
    mast = (v >= -1.0) & (v < 0.0) & (np.abs(u) <= 0.07)
    return hull | sail | mast, sail


def _train(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    body = (np.abs(u) <= 1.0) & (v >= -0.5) & (v <= 0.5)
    windows = body & (v >= -0.35) & (v <= -0.05) & (np.mod(u + 1.0, 0.5) < 0.3) & (np.abs(u) <= 0.9)
    return body, windows


def _triangle(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    return (v >= -1.0) & (v <= 0.8) & (np.abs(u) <= 0.55 * (v + 1.0)), None


def _ring(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    d2 = u * u + v * v
    return (d2 <= 1.0) & (d2 >= 0.55**2), None


def _diamond(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    return np.abs(u) + np.abs(v) <= 1.0, None


def _car(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    body = (np.abs(u) <= 1.0) & (v >= 0.0) & (v <= 0.45)
    cabin = (np.abs(u) <= 0.55) & (v >= -0.4) & (v < 0.0)
    windows = cabin & (np.abs(u) <= 0.45) & (v >= -0.3) & (np.abs(u) >= 0.06)
    return body | cabin, windows


def _stick(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, None]:
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.25), None


@dataclass(frozen=True)
class _ClassSpec:
    name: str
    shape: _Shape
    colour: tuple[int, int, int]
    texture: str  # one of _TEXTURES
    accent: tuple[int, int, int] = (0, 0, 0)
    #: Background context drawn with this class with probability ``cooccur`` (labelled background).
    context: str | None = None
    #: Bottom edge of the shape in units of the radius (where a context band starts).
    bottom: float = 1.0
    #: Upright objects (with a context below them) are never rotated.
    rotate: bool = True


#: Class catalogue in order; a dataset with C classes uses the first C. Boat and train (the
#: prototype's traps) are within the default five.
_CATALOGUE: tuple[_ClassSpec, ...] = (
    _ClassSpec("disc", _disc, (215, 50, 40), "flat"),
    _ClassSpec("square", _square, (40, 165, 60), "stripes_v"),
    _ClassSpec("cross", _cross, (235, 200, 30), "flat"),
    _ClassSpec("boat", _boat, (125, 70, 30), "stripes_h", accent=(240, 238, 230), context="water",
               bottom=0.45, rotate=False),
    _ClassSpec("train", _train, (40, 60, 165), "flat", accent=(200, 220, 240), context="rails",
               bottom=0.5, rotate=False),
    _ClassSpec("triangle", _triangle, (200, 80, 200), "dots"),
    _ClassSpec("ring", _ring, (30, 185, 200), "flat"),
    _ClassSpec("diamond", _diamond, (250, 130, 20), "checker"),
    _ClassSpec("car", _car, (170, 25, 60), "flat", accent=(180, 200, 225), context="road", bottom=0.45,
               rotate=False),
    _ClassSpec("stick", _stick, (95, 60, 145), "stripes_h"),
)
#: Names of the classes the generator can draw, in catalogue order.
SYNTH_CLASSES: tuple[str, ...] = tuple(c.name for c in _CATALOGUE)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, phase: float) -> np.ndarray:
    """Texture in [-1, 1] at pixel coordinates ``(yy, xx)`` (any matching shapes)."""
    if kind == "flat":
        return np.zeros_like(yy)
    if kind == "stripes_v":
        return np.sign(np.sin(2 * np.pi * xx / 5.0 + phase))
    if kind == "stripes_h":
        return np.sign(np.sin(2 * np.pi * yy / 4.0 + phase))
    if kind == "checker":
        return ((np.floor(xx / 4.0) + np.floor(yy / 4.0)) % 2) * 2.0 - 1.0
    if kind == "dots":
        return np.where((np.mod(xx + phase, 5.0) < 2.0) & (np.mod(yy, 5.0) < 2.0), 1.0, -0.3)
    raise ValueError(f"unknown texture {kind!r}")


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSettings:
    """Everything that determines the generated bytes (recorded in ``synth.json``)."""

    seed: int
    n_train: int
    n_mask_eval: int
    n_val: int
    image_size: int
    num_classes: int
    cooccur: float

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"synthetic dataset: {name}={getattr(self, name)!r}; expected {expected}")

        if self.n_train < 1:
            raise bad("n_train", "at least 1")
        if not 1 <= self.n_mask_eval <= self.n_train:
            raise bad("n_mask_eval", f"between 1 and n_train={self.n_train} (train is a subset of train_aug)")
        if self.n_val < 1:
            raise bad("n_val", "at least 1")
        if self.image_size < 32:
            raise bad("image_size", "at least 32 pixels")
        if not 1 <= self.num_classes <= len(_CATALOGUE):
            raise bad("num_classes", f"between 1 and {len(_CATALOGUE)} ({', '.join(SYNTH_CLASSES)})")
        if not 0.0 <= self.cooccur <= 1.0:
            raise bad("cooccur", "a probability in [0, 1]")


def _resolve_settings(preset: str, seed: int, overrides: dict[str, Any]) -> SynthSettings:
    if preset not in SYNTH_PRESETS:
        raise ValueError(f"synthetic dataset: unknown preset {preset!r}; expected one of {', '.join(SYNTH_PRESETS)}")
    values = dict(SYNTH_PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = SynthSettings(
        seed=int(seed), n_train=int(values["n_train"]), n_mask_eval=int(values["n_mask_eval"]),
        n_val=int(values["n_val"]), image_size=int(values["image_size"]),
        num_classes=int(values["num_classes"]), cooccur=float(values["cooccur"]),
    )
    settings.validate()
    return settings


# --------------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------------


@dataclass
class _Object:
    cls: int  # 0-based class index
    mask: np.ndarray  # drawn pixels (before occlusion)
    accent: np.ndarray | None
    cy: float
    cx: float
    r: float


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    return u * u + v * v <= 1.0


def _place_objects(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, num_classes: int) -> list[_Object]:
    size = yy.shape[0]
    objects: list[_Object] = []
    union = np.zeros(yy.shape, dtype=bool)
    n = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    for _ in range(n):
        cls = int(rng.integers(num_classes))
        spec = _CATALOGUE[cls]
        for _try in range(PLACEMENT_TRIES):
            r = rng.uniform(*OBJECT_RADIUS) * size
            aspect = rng.uniform(0.85, 1.2)
            cy, cx = rng.uniform(0.7 * r, size - 0.7 * r, size=2)
            angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION) if spec.rotate else 0.0
            mirror = -1.0 if rng.random() < 0.5 else 1.0
            dy, dx = (yy - cy) / r, (xx - cx) / (r * aspect)
            c, s = np.cos(angle), np.sin(angle)
            u = mirror * (c * dx + s * dy)
            v = -s * dx + c * dy
            inside, accent = spec.shape(u, v)
            area = int(inside.sum())
            if area == 0 or (inside & union).sum() > MAX_OVERLAP * area:
                continue
            objects.append(_Object(cls, inside, None if accent is None else accent & inside, cy, cx, r))
            union |= inside
            break
    return objects


def _draw_context(img: np.ndarray, kind: str, top: int, rng: np.random.Generator, yy: np.ndarray,
                  xx: np.ndarray) -> None:
    """Paint a full-width background band starting at row ``top`` (in place)."""
    size = img.shape[0]
    if top >= size:
        return
    if kind == "water":
        height = int(rng.uniform(0.15, 0.3) * size)
        rows = slice(max(top, 0), min(size, top + height))
        waves = np.sin(2 * np.pi * (yy[rows] / 4.0 + 0.3 * np.sin(xx[rows] / 5.0)))
        band = np.array([40.0, 90.0, 165.0]) + 25.0 * waves[..., None] * np.array([0.6, 0.8, 1.0])
    elif kind == "rails":
        height = max(4, int(rng.uniform(0.1, 0.14) * size))
        rows = slice(max(top, 0), min(size, top + height))
        y, x = yy[rows] - top, xx[rows]
        band = np.broadcast_to(np.array([90.0, 80.0, 70.0]), (*y.shape, 3)).copy()
        sleepers = np.mod(x, 6.0) < 2.0
        band[sleepers] = (95.0, 65.0, 40.0)
        rail = (np.abs(y - height / 3.0) < 0.6) | (np.abs(y - 2.0 * height / 3.0) < 0.6)
        band[rail] = (55.0, 55.0, 60.0)
    elif kind == "road":
        height = max(5, int(rng.uniform(0.12, 0.2) * size))
        rows = slice(max(top, 0), min(size, top + height))
        y, x = yy[rows] - top, xx[rows]
        band = np.broadcast_to(np.array([85.0, 85.0, 92.0]), (*y.shape, 3)).copy()
        dashes = (np.abs(y - height / 2.0) < 0.8) & (np.mod(x, 8.0) < 4.0)
        band[dashes] = (235.0, 235.0, 225.0)
    else:
        raise ValueError(f"unknown context {kind!r}")
    img[rows] = band


def _band_boundaries(label: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label (both sides of every boundary)."""
    edge = np.zeros(label.shape, dtype=bool)
    dx = label[:, 1:] != label[:, :-1]
    dy = label[1:, :] != label[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return edge


@dataclass
class SynthImage:
    """One rendered image with its ground truth (see :func:`render_image`)."""

    image: np.ndarray  # (S, S, 3) uint8
    mask: np.ndarray  # (S, S) uint8, 255 on boundaries
    saliency: np.ndarray  # (S, S) uint8
    objects: list[dict[str, Any]]  # visible instances: class index, box, difficult, truncated
    contexts: list[str]


def render_image(rng: np.random.Generator, *, image_size: int, num_classes: int, cooccur: float) -> SynthImage:
    """Draw one synthetic image with its mask, saliency map and object list.

    Shape:
        ``image`` ``(S, S, 3)`` uint8; ``mask`` and ``saliency`` ``(S, S)`` uint8.
    """
    size = image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: a two-colour gradient plus a low-frequency wave.
    c1, c2 = rng.uniform(70, 190, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(theta) * xx + np.sin(theta) * yy) / size + 1.0) / 2.0
    img = c1 + (c2 - c1) * t[..., None]
    fy, fx = rng.uniform(1.0, 4.0, size=2)
    img += 12.0 * np.sin(2 * np.pi * (fx * xx + fy * yy) / size + rng.uniform(0, 2 * np.pi))[..., None]

    # Clutter ellipses (background).
    clutter: list[np.ndarray] = []
    for _ in range(int(rng.integers(CLUTTER_PER_IMAGE[0], CLUTTER_PER_IMAGE[1] + 1))):
        ry, rx = rng.uniform(*CLUTTER_RADIUS, size=2) * size
        cy, cx = rng.uniform(0, size, size=2)
        ell = _ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        img[ell] = rng.uniform(40, 220, size=3)
        clutter.append(ell)

    objects = _place_objects(rng, yy, xx, num_classes)

    # Co-occurrence traps: the context of a trap class, under its first instance, with p = cooccur.
    contexts: list[str] = []
    for cls in sorted({o.cls for o in objects}):
        spec = _CATALOGUE[cls]
        if spec.context is not None and rng.random() < cooccur:
            first = next(o for o in objects if o.cls == cls)
            top = int(round(first.cy + spec.bottom * first.r))
            _draw_context(img, spec.context, top, rng, yy, xx)
            contexts.append(spec.context)

    # Objects, later ones on top; instance map for occlusion.
    label = np.zeros((size, size), dtype=np.uint8)
    instance = np.full((size, size), -1, dtype=np.int16)
    for k, obj in enumerate(objects):
        spec = _CATALOGUE[obj.cls]
        colour = np.asarray(spec.colour, dtype=np.float64) + rng.integers(
            -INSTANCE_COLOUR_JITTER, INSTANCE_COLOUR_JITTER + 1, size=3)
        tex = _texture(spec.texture, yy[obj.mask], xx[obj.mask], rng.uniform(0, 2 * np.pi))
        img[obj.mask] = colour + TEXTURE_AMPLITUDE * tex[:, None]
        if obj.accent is not None:
            img[obj.accent] = np.asarray(spec.accent, dtype=np.float64) + rng.integers(-10, 11, size=3)
        label[obj.mask] = obj.cls + 1
        instance[obj.mask] = k

    img += rng.normal(0.0, PIXEL_NOISE_STD, size=img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    mask = label.copy()
    mask[_band_boundaries(label)] = IGNORE_INDEX

    # Visible instances (with pixels outside the ignore band) for the XML.
    visible: list[dict[str, Any]] = []
    for k, obj in enumerate(objects):
        own = instance == k
        if not (own & (mask != IGNORE_INDEX)).any():
            continue
        ys, xs = np.nonzero(own)
        visible.append({
            "cls": obj.cls,
            "box": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),  # VOC: 1-based
            "difficult": int(own.sum() < DIFFICULT_VISIBLE_FRACTION * obj.mask.sum()),
            "truncated": int(xs.min() == 0 or ys.min() == 0 or xs.max() == size - 1 or ys.max() == size - 1),
        })

    # Saliency: true foreground with missed objects, a fake blob, jittered boundaries, then blur.
    fg = np.zeros((size, size), dtype=np.float32)
    for k in range(len(objects)):
        if rng.random() >= SALIENCY_MISS_PROB:
            fg[instance == k] = 1.0
    if rng.random() < SALIENCY_FAKE_BLOB_PROB:
        if clutter:
            blob = clutter[int(rng.integers(len(clutter)))]
        else:
            ry, rx = rng.uniform(*CLUTTER_RADIUS, size=2) * size
            cy, cx = rng.uniform(0, size, size=2)
            blob = _ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        fg[blob & (instance < 0)] = 1.0
    noise = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), BOUNDARY_NOISE_SIGMA)
    noise /= max(float(noise.std()), 1e-6)
    soft = gaussian_filter(fg, BOUNDARY_PRE_BLUR_SIGMA)
    near_boundary = (soft > BOUNDARY_ZONE[0]) & (soft < BOUNDARY_ZONE[1])
    jittered = np.where(near_boundary, soft + BOUNDARY_NOISE_AMPLITUDE * noise > 0.5, fg > 0.5)
    sal = gaussian_filter(jittered.astype(np.float32), SALIENCY_BLUR_SIGMA) * rng.uniform(*SALIENCY_CONFIDENCE)
    saliency = np.clip(np.rint(sal * 255.0), 0, 255).astype(np.uint8)

    return SynthImage(image=image, mask=mask, saliency=saliency, objects=visible, contexts=contexts)


# --------------------------------------------------------------------------------------------------
# Writing a dataset
# --------------------------------------------------------------------------------------------------


def _annotation_xml(image_id: str, size: int, objects: list[dict[str, Any]], names: tuple[str, ...]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "synth"
    ET.SubElement(root, "filename").text = f"{image_id}{IMAGE_EXT}"
    sz = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = names[obj["cls"]]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(obj["truncated"])
        ET.SubElement(node, "difficult").text = str(obj["difficult"])
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"], strict=True):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _split_ids(settings: SynthSettings) -> dict[str, list[str]]:
    train_aug = [f"train_{i:05d}" for i in range(settings.n_train)]
    return {
        "train_aug": train_aug,
        "train": train_aug[: settings.n_mask_eval],
        "val": [f"val_{i:05d}" for i in range(settings.n_val)],
    }


def _settings_record(settings: SynthSettings, preset: str, names: tuple[str, ...]) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "settings": asdict(settings),
        "preset": preset,
        "class_names": list(names),
        "contexts": {c.name: c.context for c in _CATALOGUE[: settings.num_classes] if c.context},
    }


def _write_dataset(root: Path, settings: SynthSettings, preset: str) -> None:
    names = SYNTH_CLASSES[: settings.num_classes]
    dirs = {key: root / sub for key, sub in (("img", "JPEGImages"), ("mask", "SegmentationClassAug"),
                                              ("sal", "SaliencyMaps"), ("xml", ANNOTATION_DIR))}
    for d in dirs.values():
        d.mkdir(parents=True)
    splits = _split_ids(settings)
    labels: dict[str, np.ndarray] = {}
    for split in ("train_aug", "val"):
        for index, image_id in enumerate(splits[split]):
            rng = np.random.default_rng([settings.seed, _SPLIT_STREAM[split], index])
            r = render_image(rng, image_size=settings.image_size, num_classes=settings.num_classes,
                             cooccur=settings.cooccur)
            (dirs["img"] / f"{image_id}{IMAGE_EXT}").write_bytes(_jpeg_bytes(r.image))
            (dirs["mask"] / f"{image_id}{MASK_EXT}").write_bytes(encode_mask_png(r.mask))
            (dirs["sal"] / f"{image_id}{SALIENCY_EXT}").write_bytes(_png_bytes(r.saliency))
            (dirs["xml"] / f"{image_id}.xml").write_bytes(
                _annotation_xml(image_id, settings.image_size, r.objects, names))
            present = np.bincount(r.mask.reshape(-1), minlength=256)[1 : settings.num_classes + 1] > 0
            labels[image_id] = present.astype(np.float32)
    np.save(root / CLS_LABELS_FILE, np.array(labels, dtype=object), allow_pickle=True)
    (root / CLASS_NAMES_FILE).write_text("".join(f"{n}\n" for n in names))
    split_dir = root / SPLIT_DIR
    split_dir.mkdir(parents=True)
    for split, ids in splits.items():
        (split_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    # Written last: marks the folder complete.
    record = _settings_record(settings, preset, names)
    (root / SETTINGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _existing_state(out: Path, settings: SynthSettings) -> str:
    """``absent``, ``complete``, ``incomplete`` (ours, same settings, files missing), ``different``
    (ours, other settings) or ``foreign`` (a folder we did not write)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "absent"
    record_path = out / SETTINGS_FILE
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return "foreign"
    if record.get("generator_version") != GENERATOR_VERSION or record.get("settings") != asdict(settings):
        return "different"
    splits = _split_ids(settings)
    for split in splits:
        if not (out / SPLIT_DIR / f"{split}.txt").is_file():
            return "incomplete"
    for image_id in splits["train_aug"] + splits["val"]:
        for path in (out / "JPEGImages" / f"{image_id}{IMAGE_EXT}",
                     out / "SegmentationClassAug" / f"{image_id}{MASK_EXT}",
                     out / "SaliencyMaps" / f"{image_id}{SALIENCY_EXT}"):
            if not path.is_file():
                return "incomplete"
    if not (out / CLS_LABELS_FILE).is_file():
        return "incomplete"
    return "complete"


def generate_synthetic_voc(
    out: str | Path,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_mask_eval: int | None = None,
    n_val: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    cooccur: float | None = None,
    preset: str = "default",
    overwrite: bool = False,
) -> Path:
    """Generate a synthetic VOC-format dataset in ``out`` (or return it if already there).

    Args:
        out: Dataset folder to create.
        seed: Same seed and settings give byte-identical files.
        n_train: Images in ``train_aug`` (default preset: 600).
        n_mask_eval: The first ``n_mask_eval`` of them form ``train``, the split on which pseudo
            masks are scored (200).
        n_val: Images in ``val`` (200).
        image_size: Side of the square images (96).
        num_classes: Object classes C, the first C of :data:`SYNTH_CLASSES` (5).
        cooccur: Probability that a trap class's context is drawn with it (0.4).
        preset: Name in :data:`SYNTH_PRESETS` supplying every setting left as ``None``.
        overwrite: Replace a folder that holds other data or other settings.

    Returns:
        ``out``. A complete folder with the same settings is returned untouched; otherwise the
        dataset is written to a temporary sibling and renamed, so no partial output is left. A file
        lock next to ``out`` serialises concurrent calls.

    Raises:
        DataError: ``out`` holds something else and ``overwrite`` is false.
    """
    settings = _resolve_settings(preset, seed, {
        "n_train": n_train, "n_mask_eval": n_mask_eval, "n_val": n_val, "image_size": image_size,
        "num_classes": num_classes, "cooccur": cooccur,
    })
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        state = _existing_state(out, settings)
        if state == "complete" and not overwrite:
            return out
        if state == "foreign" and not overwrite:
            raise DataError(f"{out}: exists and is not a synthetic dataset (no readable {SETTINGS_FILE}); "
                            "choose another folder or pass overwrite=True", file=out, kind="invalid")
        if state == "different" and not overwrite:
            raise DataError(f"{out}: holds a synthetic dataset with other settings (see {out / SETTINGS_FILE}); "
                            f"wanted {asdict(settings)}; choose another folder or pass overwrite=True",
                            file=out, kind="invalid")
        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder", file=out, kind="invalid")
        with atomic_dir(out) as tmp:
            _write_dataset(tmp, settings, preset)
    return out
