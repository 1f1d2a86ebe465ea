"""Scene layout and drawing for the shapes testbed: 336x336 RGB, textured noisy background, 2-6 shapes.

A `Scene` is pure data (classes, boxes, a background seed); `render` turns it into pixels deterministically,
plus a per-patch label map (which object covers each 14x14 patch) used as dense supervision in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vtprune.testbed.world import COLOUR_RGB, NUM_CLASSES, SHAPES, colour_of, shape_of, world

IMAGE_SIZE = 336
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 patches a side, 576 visual tokens
MIN_SIZE, MAX_SIZE = 2 * PATCH_SIZE, 6 * PATCH_SIZE  # object width in pixels
_GAP = 4  # minimum free pixels between two objects' boxes
_REGION_MARGIN = 20  # an object is "in the top-left" only if its centre is this far from both midlines
BACKGROUND_LABEL = NUM_CLASSES  # patch label of a patch no object covers
REGIONS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")


def patch_quadrants() -> np.ndarray:
    """(576,) index into `REGIONS` of each patch's quadrant, patches in reading order."""
    cell = np.arange(GRID * GRID)
    return 2 * (cell // GRID >= GRID // 2) + (cell % GRID >= GRID // 2)


@dataclass(frozen=True)
class SceneObject:
    cls: int
    x: int  # left edge, pixels
    y: int  # top edge, pixels
    size: int  # width = height, pixels

    @property
    def colour(self) -> int:
        return colour_of(self.cls)

    @property
    def shape(self) -> int:
        return shape_of(self.cls)

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2

    def region(self) -> str | None:
        """The quadrant the object's centre lies in, or None when it is too close to a midline to say."""
        cx, cy = self.centre
        half = IMAGE_SIZE / 2
        if abs(cx - half) < _REGION_MARGIN or abs(cy - half) < _REGION_MARGIN:
            return None
        return ("top" if cy < half else "bottom") + "-" + ("left" if cx < half else "right")


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background_seed: int

    @property
    def classes(self) -> list[int]:
        return [o.cls for o in self.objects]


def _overlaps(x: int, y: int, s: int, boxes: list[SceneObject]) -> bool:
    return any(
        x < b.x + b.size + _GAP and b.x < x + s + _GAP and y < b.y + b.size + _GAP and b.y < y + s + _GAP
        for b in boxes
    )


def sample_scene(rng: np.random.Generator) -> Scene:
    """Classes from the world's co-occurrence model, sizes 2-6 patches, non-overlapping positions."""
    placed: list[SceneObject] = []
    for cls in world().sample_classes(rng):
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        while True:
            for _ in range(100):
                x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
                if not _overlaps(x, y, size, placed):
                    placed.append(SceneObject(cls, x, y, size))
                    break
            else:
                size = max(MIN_SIZE, int(size * 0.8))
                continue
            break
    return Scene(objects=tuple(placed), background_seed=int(rng.integers(2**31)))


@lru_cache(maxsize=1024)
def shape_mask(shape: int, size: int) -> np.ndarray:
    """Coverage in [0, 1] of a `size` x `size` box by the shape, drawn at 4x and box-filtered (anti-aliased)."""
    k = 4 * size
    img = Image.new("L", (k, k), 0)
    d = ImageDraw.Draw(img)

    def pts(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(u * k, v * k) for u, v in seq]

    name = SHAPES[shape]
    if name == "circle":
        d.ellipse((0, 0, k - 1, k - 1), fill=255)
    elif name == "square":
        d.rectangle(tuple(c * k for c in (0.08, 0.08, 0.92, 0.92)), fill=255)
    elif name == "triangle":
        d.polygon(pts([(0.5, 0.04), (0.97, 0.93), (0.03, 0.93)]), fill=255)
    elif name == "diamond":
        d.polygon(pts([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]), fill=255)
    elif name == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 0.5, 0.21)
        d.polygon(
            pts(list(zip(0.5 + radii * np.cos(angles), 0.53 + radii * np.sin(angles), strict=True))), fill=255
        )
    elif name == "cross":
        a, b = 0.33, 0.67
        d.polygon(
            pts(
                [
                    (a, 0),
                    (b, 0),
                    (b, a),
                    (1, a),
                    (1, b),
                    (b, b),
                    (b, 1),
                    (a, 1),
                    (a, b),
                    (0, b),
                    (0, a),
                    (a, a),
                ]
            ),
            fill=255,
        )
    elif name == "ring":
        d.ellipse((0, 0, k - 1, k - 1), fill=255)
        d.ellipse(tuple(c * k for c in (0.28, 0.28, 0.72, 0.72)), fill=0)
    elif name == "moon":
        d.ellipse((0, 0, k - 1, k - 1), fill=255)
        d.ellipse(tuple(c * k for c in (0.38, -0.06, 1.38, 0.94)), fill=0)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {name!r}")
    mask = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    mask.setflags(write=False)
    return mask


_NOISE_BANK = 512  # noise is drawn at half resolution: 2x2-pixel grain


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Grey grain noise (std 9) that backgrounds crop at random offsets: drawing fresh noise is slow."""
    noise = np.random.default_rng(12345).standard_normal(size=(_NOISE_BANK, _NOISE_BANK, 1), dtype=np.float32)
    noise *= 9.0
    noise.setflags(write=False)
    return noise


def render_background(seed: int) -> np.ndarray:
    """A low-saturation textured background: smooth blotches, an oriented stripe texture and grain noise.

    It is computed at half resolution and upsampled 2x (nearest): the grain looks the same and the PNGs are
    several times smaller, since half the rows and columns repeat.
    """
    rng = np.random.default_rng(seed)
    n = IMAGE_SIZE // 2
    base = rng.uniform(85, 170) + rng.uniform(-12, 12, size=3)
    coarse = rng.normal(0, 30, size=(7, 7, 1)) + rng.normal(0, 6, size=(7, 7, 3))
    blotches = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
            (n, n), Image.Resampling.BICUBIC
        ),
        dtype=np.float32,
    )
    theta, period = rng.uniform(0, np.pi), rng.uniform(2.5, 10)
    amplitude = rng.uniform(6, 18)
    axis = np.arange(n, dtype=np.float32)
    phase = (2 * np.pi / period) * (axis[None, :] * np.cos(theta) + axis[:, None] * np.sin(theta))
    oy, ox = (int(v) for v in rng.integers(0, _NOISE_BANK - n, size=2))
    img = _noise_bank()[oy : oy + n, ox : ox + n] + blotches
    img += (amplitude * np.sin(phase)).astype(np.float32)[..., None]
    img += (base - 128.0).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255)
    return np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)


def render(scene: Scene, with_labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels (336, 336, 3) uint8 and, if asked, patch labels (576,) int64 (class id, or BACKGROUND_LABEL)."""
    img = render_background(scene.background_seed)
    rng = np.random.default_rng(scene.background_seed + 1)
    owner = np.full((IMAGE_SIZE, IMAGE_SIZE), -1, dtype=np.int64)
    for i, obj in enumerate(scene.objects):
        alpha = shape_mask(obj.shape, obj.size)[..., None]
        colour = np.asarray(COLOUR_RGB[obj.colour], dtype=np.float32) + rng.uniform(-15, 15, size=3)
        fill = colour + rng.normal(0, 6, size=(obj.size, obj.size, 3))
        sl = (slice(obj.y, obj.y + obj.size), slice(obj.x, obj.x + obj.size))
        img[sl] = img[sl] * (1 - alpha) + fill * alpha
        owner[sl][alpha[..., 0] > 0.5] = i
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if not with_labels:
        return pixels, None
    return pixels, patch_labels(owner, scene)


def patch_labels(owner: np.ndarray, scene: Scene) -> np.ndarray:
    """Per patch (row-major, as the vision tower orders them), the class of the object covering >= 25% of it."""
    labels = np.full(GRID * GRID, BACKGROUND_LABEL, dtype=np.int64)
    if not scene.objects:
        return labels
    onehot = owner[..., None] == np.arange(len(scene.objects))
    counts = onehot.reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE, -1).sum(axis=(1, 3)).reshape(GRID * GRID, -1)
    best = counts.argmax(axis=1)
    covered = counts.max(axis=1) >= PATCH_SIZE * PATCH_SIZE // 4
    classes = np.asarray(scene.classes)
    labels[covered] = classes[best[covered]]
    return labels


def blank_image(level: int = 128) -> np.ndarray:
    """A uniform grey image: what the model sees when the image carries no information."""
    return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, dtype=np.uint8)
