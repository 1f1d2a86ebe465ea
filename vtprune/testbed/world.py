"""The object vocabulary of the shapes testbed and its co-occurrence structure.

Objects are (colour, shape) pairs: 8 colours x 8 shapes = 64 classes, `class_id = colour * 8 + shape`.
Scenes are not uniform draws: classes have Zipf-like frequencies and are grouped into 16 *themes* of 4 classes
that tend to appear together. That gives POPE its three kinds of negatives: `random` (any absent class),
`popular` (the most frequent classes) and `adversarial` (classes that often co-occur with those present).
The world is fixed (one constant seed), so training and evaluation data share it whatever their own seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink")
COLOUR_RGB: tuple[tuple[int, int, int], ...] = (
    (220, 30, 30),
    (30, 170, 50),
    (35, 70, 235),
    (245, 225, 30),
    (255, 135, 0),
    (145, 45, 205),
    (30, 215, 225),
    (255, 120, 200),
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "moon")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
    "ring": "rings",
    "moon": "moons",
}
NUM_COLOURS = len(COLOURS)
NUM_SHAPES = len(SHAPES)
NUM_CLASSES = NUM_COLOURS * NUM_SHAPES
MIN_OBJECTS, MAX_OBJECTS = 2, 6

_WORLD_SEED = 20240607
_NUM_THEMES = 16
_THEME_SIZE = 4
_THEME_PROB = 0.85  # probability that a scene is built around a theme


def class_id(colour: int, shape: int) -> int:
    return colour * NUM_SHAPES + shape


def colour_of(cls: int) -> int:
    return cls // NUM_SHAPES


def shape_of(cls: int) -> int:
    return cls % NUM_SHAPES


def class_name(cls: int) -> str:
    """'red circle' for class 0."""
    return f"{COLOURS[colour_of(cls)]} {SHAPES[shape_of(cls)]}"


@dataclass(frozen=True)
class World:
    """Class frequencies (unnormalised weights) and themes (rows of class ids that co-occur)."""

    weights: np.ndarray  # (NUM_CLASSES,) float
    themes: np.ndarray  # (_NUM_THEMES, _THEME_SIZE) int

    def sample_classes(self, rng: np.random.Generator) -> list[int]:
        """Distinct class ids of one scene: 2-6 objects, mostly around one theme."""
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        chosen: list[int] = []
        if rng.random() < _THEME_PROB:
            theme = self.themes[int(rng.integers(len(self.themes)))]
            m = min(n, int(rng.integers(2, 4)))
            chosen.extend(int(c) for c in rng.choice(theme, size=m, replace=False))
        while len(chosen) < n:
            w = self.weights.copy()
            w[chosen] = 0.0
            chosen.append(int(rng.choice(NUM_CLASSES, p=w / w.sum())))
        return chosen


@lru_cache(maxsize=1)
def world() -> World:
    rng = np.random.default_rng(_WORLD_SEED)
    ranks = rng.permutation(NUM_CLASSES)
    weights = 1.0 / (ranks + 3.0)
    themes = rng.permutation(NUM_CLASSES).reshape(_NUM_THEMES, _THEME_SIZE)
    return World(weights=weights, themes=themes)


@dataclass(frozen=True)
class CooccurrenceStats:
    """Statistics of the world estimated from a large fixed sample of scenes (as POPE does from COCO)."""

    frequency: np.ndarray  # (NUM_CLASSES,) fraction of scenes containing each class
    cooccurrence: np.ndarray  # (NUM_CLASSES, NUM_CLASSES) fraction of scenes containing both (diagonal 0)

    def popularity_order(self) -> np.ndarray:
        """Class ids from most to least frequent (ties broken by class id)."""
        return np.lexsort((np.arange(NUM_CLASSES), -self.frequency))

    def cooccurrence_score(self, present: list[int]) -> np.ndarray:
        """For every class, how often it appears together with the classes in `present`."""
        return self.cooccurrence[present].sum(axis=0)


@lru_cache(maxsize=1)
def cooccurrence_stats(num_scenes: int = 20000) -> CooccurrenceStats:
    rng = np.random.default_rng(_WORLD_SEED + 1)
    presence = np.zeros((num_scenes, NUM_CLASSES), dtype=np.float64)
    w = world()
    for i in range(num_scenes):
        presence[i, w.sample_classes(rng)] = 1.0
    cooc = presence.T @ presence / num_scenes
    np.fill_diagonal(cooc, 0.0)
    return CooccurrenceStats(frequency=presence.mean(axis=0), cooccurrence=cooc)
