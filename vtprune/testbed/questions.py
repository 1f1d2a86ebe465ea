"""Questions about shapes scenes: POPE-style yes/no probes and ScienceQA-style multiple choice.

The prompt texts follow lmms-eval: POPE appends "\\nAnswer the question using a single word or phrase.", and
ScienceQA lists the options as "A. x" lines then "\\nAnswer with the option's letter from the given choices
directly.". The chat template of the processor wraps them as "USER: <image>\\n{text} ASSISTANT:".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vtprune.testbed.render import IMAGE_SIZE, REGIONS, Scene, SceneObject
from vtprune.testbed.world import (
    COLOURS,
    NUM_CLASSES,
    NUM_COLOURS,
    NUM_SHAPES,
    SHAPE_PLURALS,
    SHAPES,
    class_name,
    colour_of,
    cooccurrence_stats,
    shape_of,
)

POPE_CATEGORIES: tuple[str, ...] = ("random", "popular", "adversarial")
POPE_POST_PROMPT = "\nAnswer the question using a single word or phrase."
MCQ_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
# LLaVA's `vicuna_v1` system prompt: training sees it half the time so that either prompt style works.
SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
MCQ_TYPES: tuple[str, ...] = ("count_shape", "count_colour", "colour_at", "shape_at")
COUNT_MCQ_TYPES: tuple[str, ...] = MCQ_TYPES[:2]
POSITION_MCQ_TYPES: tuple[str, ...] = MCQ_TYPES[2:]
CAPTION_PROMPT = "Describe this image."
NUM_CHOICES = 4
LETTERS = "ABCDEFGH"


def _with_article(phrase: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _attribute_phrase(name: str, is_colour: bool) -> str:
    """One colour or one shape as what a yes/no probe asks for: 'a red object', 'a star'."""
    return _with_article(f"{name} object" if is_colour else name)


def pope_question(cls: int) -> str:
    return f"Is there {_with_article(f'{COLOURS[colour_of(cls)]} {SHAPES[shape_of(cls)]}')} in the image?"


def pope_text(question: str) -> str:
    return question + POPE_POST_PROMPT


def mcq_text(question: str, choices: list[str], hint: str = "") -> str:
    """lmms-eval's ScienceQA prompt (`format: default`)."""
    context = f"Context: {hint}\n" if hint else ""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{context}{question}\n{options}{MCQ_POST_PROMPT}"


def pope_negatives(
    present: list[int], category: str, k: int, rng: np.random.Generator, pool: int = 0
) -> list[int]:
    """`k` absent classes chosen as POPE does for `category`.

    popular: the most frequent absent classes; adversarial: the absent classes that co-occur most with the
    present ones; random: uniform. With `pool > k` the top-`pool` candidates are sampled from instead of taking
    the first `k` (more varied hard negatives for training).
    """
    absent = np.setdiff1d(np.arange(NUM_CLASSES), present)
    if category == "random":
        return [int(c) for c in rng.choice(absent, size=k, replace=False)]
    stats = cooccurrence_stats()
    if category == "popular":
        score = stats.frequency
    elif category == "adversarial":
        score = stats.cooccurrence_score(present)
    else:
        raise ValueError(f"unknown POPE category {category!r}; expected one of {POPE_CATEGORIES}")
    ranked = absent[np.lexsort((absent, -score[absent]))]
    if pool > k:
        return [int(c) for c in rng.choice(ranked[:pool], size=k, replace=False)]
    return [int(c) for c in ranked[:k]]


@dataclass(frozen=True)
class McqItem:
    question: str
    choices: list[str]
    answer: int  # index into choices
    qtype: str


def _count_choices(count: int, rng: np.random.Generator) -> tuple[list[str], int]:
    start = max(0, count - int(rng.integers(0, NUM_CHOICES)))
    return [str(start + i) for i in range(NUM_CHOICES)], count - start


def _name_choices(
    answer: str, others_present: list[str], vocabulary: tuple[str, ...], rng: np.random.Generator
):
    """The answer plus distractors, preferring names that are in the image elsewhere (so position matters)."""
    present = [n for n in dict.fromkeys(others_present) if n != answer]
    rest = [n for n in vocabulary if n != answer and n not in present]
    rng.shuffle(present)
    rng.shuffle(rest)
    choices = [answer, *(present + rest)[: NUM_CHOICES - 1]]
    order = rng.permutation(NUM_CHOICES)
    choices = [choices[i] for i in order]
    return choices, choices.index(answer)


def _quadrant(obj: SceneObject) -> str:
    cx, cy = obj.centre
    half = IMAGE_SIZE / 2
    return ("top" if cy < half else "bottom") + "-" + ("left" if cx < half else "right")


def object_alone_in(scene: Scene, region: str) -> SceneObject | None:
    """The only object whose centre is in `region`, if it is clearly inside it."""
    inside = [o for o in scene.objects if _quadrant(o) == region]
    if len(inside) == 1 and inside[0].region() == region:
        return inside[0]
    return None


def pick_lone_object(scene: Scene, rng: np.random.Generator) -> tuple[str, SceneObject] | None:
    """A random quadrant that holds one object alone, and that object (None when no quadrant does)."""
    regions = [r for r in REGIONS if object_alone_in(scene, r) is not None]
    if not regions:
        return None
    region = str(rng.choice(regions))
    return region, object_alone_in(scene, region)  # type: ignore[return-value]


def make_mcq(scene: Scene, qtype: str, rng: np.random.Generator) -> McqItem | None:
    """A question of type `qtype` about `scene`, or None when the scene cannot support one unambiguously."""
    objs = scene.objects
    if qtype == "count_shape":
        shapes = [o.shape for o in objs]
        shape = int(rng.choice(shapes)) if rng.random() < 0.6 else int(rng.integers(NUM_SHAPES))
        choices, answer = _count_choices(shapes.count(shape), rng)
        return McqItem(f"How many {SHAPE_PLURALS[SHAPES[shape]]} are there?", choices, answer, qtype)
    if qtype == "count_colour":
        colours = [o.colour for o in objs]
        colour = int(rng.choice(colours)) if rng.random() < 0.6 else int(rng.integers(NUM_COLOURS))
        choices, answer = _count_choices(colours.count(colour), rng)
        return McqItem(f"How many {COLOURS[colour]} objects are there?", choices, answer, qtype)
    if qtype in ("colour_at", "shape_at"):
        picked = pick_lone_object(scene, rng)
        if picked is None:
            return None
        region, target = picked
        others = [o for o in objs if o is not target]
        if qtype == "colour_at":
            choices, answer = _name_choices(
                COLOURS[target.colour], [COLOURS[o.colour] for o in others], COLOURS, rng
            )
            return McqItem(f"Which colour is the shape in the {region}?", choices, answer, qtype)
        choices, answer = _name_choices(SHAPES[target.shape], [SHAPES[o.shape] for o in others], SHAPES, rng)
        return McqItem(f"Which shape is in the {region}?", choices, answer, qtype)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {MCQ_TYPES}")


def caption(scene: Scene) -> str:
    """'red circle , blue square .': the objects in reading order (bands of 4 patches, then left to right)."""
    band = IMAGE_SIZE / 6
    objects = sorted(scene.objects, key=lambda o: (int(o.centre[1] // band), o.centre[0]))
    return " , ".join(class_name(o.cls) for o in objects) + " ."


@dataclass(frozen=True)
class TrainingExample:
    text: str  # the user text (question + instructions), before the chat template
    answer: str  # "yes", "no", a letter, or a caption (several words)
    # "pope", "mcq", "caption", "attribute", "region", "region_check", "position_open" or "mcq_hinted"
    kind: str
    qtype: str = ""  # the MCQ type (`MCQ_TYPES`) of an "mcq" or "position_open" example


def binding_negatives(present: list[int]) -> list[int]:
    """Absent classes whose colour and whose shape are both in the scene, on different objects ("a red star"
    when a red circle and a blue star are present): only binding colour to shape answers them."""
    colours = {colour_of(c) for c in present}
    shapes = {shape_of(c) for c in present}
    absent = [c for c in range(NUM_CLASSES) if c not in present]
    return [c for c in absent if colour_of(c) in colours and shape_of(c) in shapes]


def attribute_probe(scene: Scene, rng: np.random.Generator) -> TrainingExample:
    """'Is there a red object in the image?' or 'Is there a star in the image?', half of them yes: one word to
    look up in the image, the stepping stone to a POPE probe, which needs two on the same object."""
    is_colour = bool(rng.random() < 0.5)
    present = {o.colour if is_colour else o.shape for o in scene.objects}
    names = COLOURS if is_colour else SHAPES
    yes = bool(rng.random() < 0.5)
    choices = sorted(present) if yes else [v for v in range(len(names)) if v not in present]
    question = f"Is there {_attribute_phrase(names[int(rng.choice(choices))], is_colour)} in the image?"
    return TrainingExample(pope_text(question), "yes" if yes else "no", "attribute")


def region_probe(scene: Scene, rng: np.random.Generator) -> TrainingExample | None:
    """'What is in the top-left?' -> 'red circle', for a quadrant that holds one object alone (None if no
    quadrant does): the position lookup of `colour_at`/`shape_at` answered in words, without the step of
    matching the answer to a lettered option, the stepping stone to those MCQs."""
    picked = pick_lone_object(scene, rng)
    if picked is None:
        return None
    region, target = picked
    return TrainingExample(pope_text(f"What is in the {region}?"), class_name(target.cls), "region")


def region_check(scene: Scene, rng: np.random.Generator) -> TrainingExample | None:
    """'Is there a red object in the top-left?' or 'Is there a star in the top-left?' about a quadrant that holds
    one object alone (None if no quadrant does), half of them yes. A "no" names, where it can, a colour or shape
    that is elsewhere in the scene. It is the check a `colour_at`/`shape_at` MCQ needs for each of its options
    (which are the answer and attributes of the other objects), asked as a yes/no lookup."""
    picked = pick_lone_object(scene, rng)
    if picked is None:
        return None
    region, target = picked
    is_colour = bool(rng.random() < 0.5)
    names = COLOURS if is_colour else SHAPES
    value = target.colour if is_colour else target.shape
    yes = bool(rng.random() < 0.5)
    if not yes:
        elsewhere = sorted({o.colour if is_colour else o.shape for o in scene.objects} - {value})
        value = int(rng.choice(elsewhere or [v for v in range(len(names)) if v != value]))
    question = f"Is there {_attribute_phrase(names[value], is_colour)} in the {region}?"
    return TrainingExample(pope_text(question), "yes" if yes else "no", "region_check")


def _random_mcq(scene: Scene, qtypes: tuple[str, ...], rng: np.random.Generator) -> McqItem | None:
    """An MCQ of a type drawn uniformly from `qtypes` (None when the scene cannot support it)."""
    return make_mcq(scene, qtypes[int(rng.integers(len(qtypes)))], rng)


def open_position_question(scene: Scene, rng: np.random.Generator) -> TrainingExample | None:
    """A `colour_at` or `shape_at` MCQ asked without its options ("Which colour is the shape in the top-left?" ->
    "red"; None when no quadrant holds one object alone). It has the MCQ's exact question words, so that the
    lookup it trains happens on the same prompt prefix as the MCQ's: a causal LLM computes the same thing at
    those positions in both, and the MCQ is left to match the looked-up word to an option."""
    item = _random_mcq(scene, POSITION_MCQ_TYPES, rng)
    if item is None:
        return None
    return TrainingExample(pope_text(item.question), item.choices[item.answer], "position_open", item.qtype)


def hinted_mcq(
    scene: Scene, rng: np.random.Generator, qtypes: tuple[str, ...] = POSITION_MCQ_TYPES
) -> TrainingExample | None:
    """An MCQ of one of `qtypes` whose ScienceQA context gives the answer away ("Context: The answer is red.\n
    Which colour is the shape in the top-left?\nA. ..."; None when the scene cannot support the question). It
    needs no image: only the step of matching a word to its option's letter, taught apart from the lookup that
    a real MCQ needs first."""
    item = _random_mcq(scene, qtypes, rng)
    if item is None:
        return None
    text = mcq_text(item.question, item.choices, hint=f"The answer is {item.choices[item.answer]}.")
    return TrainingExample(text, LETTERS[item.answer], "mcq_hinted", item.qtype)


def sample_training_example(
    scene: Scene,
    rng: np.random.Generator,
    mcq_fraction: float = 0.5,
    caption_fraction: float = 0.0,
    binding_fraction: float = 0.0,
    attribute_fraction: float = 0.0,
    position_fraction: float | None = None,
    region_fraction: float = 0.0,
    region_check_fraction: float = 0.0,
    open_position_fraction: float = 0.0,
    hinted_fraction: float = 0.0,
) -> TrainingExample:
    """One random example about `scene`: a caption, an MCQ, or a balanced yes/no POPE probe (all three kinds
    of negatives). Captions are the dense signal that teaches the LLM to read the image at all: a yes/no
    answer depends only on the *interaction* of question and image, which a randomly initialised model
    does not find from POPE and MCQ alone. With `binding_fraction > 0`, that fraction of the negatives are
    `binding_negatives` where the scene has any (hard negatives), and with `attribute_fraction > 0` that
    fraction of the yes/no probes are `attribute_probe`s (kind "attribute"). With `position_fraction`, that
    fraction of the MCQs are position questions (`colour_at`, `shape_at`); None draws the four types uniformly.
    With `region_fraction`, that fraction of the examples are `region_probe`s (kind "region") where the scene
    has one, with `region_check_fraction` that fraction are `region_check`s (kind "region_check"), and with
    `open_position_fraction` that fraction are `open_position_question`s (kind "position_open"), and with
    `hinted_fraction` that fraction are position `hinted_mcq`s (kind "mcq_hinted"). The defaults
    draw exactly what earlier versions drew."""
    # consecutive bands of [0, 1): the draw picks one; a kind the scene cannot support falls through to the MCQ
    bands = (
        (caption_fraction, lambda: TrainingExample(CAPTION_PROMPT, caption(scene), "caption")),
        (region_fraction, lambda: region_probe(scene, rng)),
        (region_check_fraction, lambda: region_check(scene, rng)),
        (open_position_fraction, lambda: open_position_question(scene, rng)),
        (hinted_fraction, lambda: hinted_mcq(scene, rng)),
    )
    draw, start = rng.random(), 0.0
    for fraction, make in bands:
        if start <= draw < start + fraction and (example := make()) is not None:
            return example
        start += fraction
    if draw < start + mcq_fraction:
        if position_fraction is None:
            qtypes = MCQ_TYPES
        else:
            qtypes = POSITION_MCQ_TYPES if rng.random() < position_fraction else COUNT_MCQ_TYPES
        item = _random_mcq(scene, qtypes, rng)
        if item is not None:
            text = mcq_text(item.question, item.choices)
            return TrainingExample(text, LETTERS[item.answer], "mcq", item.qtype)
    if attribute_fraction > 0 and rng.random() < attribute_fraction:
        return attribute_probe(scene, rng)
    present = scene.classes
    if rng.random() < 0.5:
        cls, answer = int(rng.choice(present)), "yes"
    elif binding_fraction > 0 and rng.random() < binding_fraction and (hard := binding_negatives(present)):
        cls, answer = int(rng.choice(hard)), "no"
    else:
        category = POPE_CATEGORIES[int(rng.integers(len(POPE_CATEGORIES)))]
        cls, answer = pope_negatives(present, category, 1, rng, pool=6)[0], "no"
    return TrainingExample(pope_text(pope_question(cls)), answer, "pope")
