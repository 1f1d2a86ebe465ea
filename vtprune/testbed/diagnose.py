"""Where a testbed checkpoint fails at position questions: region lookups, attention to the asked-about object,
and how much of the features is position.

    python -m vtprune.testbed.diagnose                          # the shipped checkpoint
    python -m vtprune.testbed.diagnose --model /tmp/run/model --scenes 200 --out diagnosis.json

Three measurements on held-out scenes (the evaluation seed, a random stream of their own), each scene asked about
every quadrant that holds one object alone ("What is in the top-left?", the question the `colour_at`/`shape_at`
MCQs need answered first):

- `region`: how often the greedy answer names that object's colour and shape, and how often it names another
  object of the scene instead, by number of objects in the scene;
- `attention`: per LLM layer and head, the attention weight that the last prompt token gives to the patches of
  that object, to the other objects' patches and to the background of the quadrant;
- `features`: the share of the variance of object patches explained by their quadrant and by their class, at
  the vision layer LLaVA uses, after the projector, and after the first LLM layer's RMSNorm.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vtprune.testbed import evaluate as ev
from vtprune.testbed.questions import REGIONS, object_alone_in, pope_text
from vtprune.testbed.render import BACKGROUND_LABEL, Scene, SceneObject, patch_quadrants, render, sample_scene
from vtprune.testbed.shapes import scene_rng
from vtprune.testbed.world import class_name

STREAM_DIAGNOSE = 4  # a random stream of the evaluation seed that no benchmark file uses


def region_questions(num_scenes: int) -> list[tuple[Scene, str, SceneObject]]:
    """(scene, quadrant, the object alone in it) for every such quadrant of `num_scenes` held-out scenes."""
    items = []
    for index in range(num_scenes):
        scene = sample_scene(scene_rng(ev.EVAL_SEED, STREAM_DIAGNOSE, index))
        for region in REGIONS:
            target = object_alone_in(scene, region)
            if target is not None:
                items.append((scene, region, target))
    return items


def _share(x: torch.Tensor, groups: torch.Tensor) -> float:
    """Between-group share of the total variance of the rows of `x`."""
    x = x.double() - x.double().mean(0)
    between = sum(int((groups == g).sum()) * x[groups == g].mean(0).pow(2).sum() for g in groups.unique())
    return round(float(between / x.pow(2).sum()), 4)


@torch.no_grad()
def diagnose(model: Any, processor: Any, num_scenes: int = 100, batch_size: int = 16) -> dict[str, Any]:
    items = region_questions(num_scenes)
    if not items:
        raise ValueError(f"no quadrant holds an object alone in {num_scenes} scenes; ask for more scenes")
    quadrants = torch.from_numpy(patch_quadrants())
    text_config = model.config.text_config
    attention = torch.zeros(
        text_config.num_hidden_layers, text_config.num_attention_heads, 3, dtype=torch.float64
    )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # questions, colour, shape, other object
    feats: dict[str, list[torch.Tensor]] = defaultdict(list)
    labels_seen, quadrants_seen = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rendered = [render(scene, with_labels=True) for scene, _, _ in chunk]
        prompts = [
            ev.chat_prompt(processor, pope_text(f"What is in the {region}?")) for _, region, _ in chunk
        ]
        inputs = processor(images=[Image.fromarray(p) for p, _ in rendered], text=prompts, padding=True,
                           return_tensors="pt").to(model.device)  # fmt: skip
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers = processor.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        is_image = inputs["input_ids"] == model.config.image_token_id
        for b, ((scene, region, target), (_, labels), answer) in enumerate(
            zip(chunk, rendered, answers, strict=True)
        ):
            words, gold = answer.split(), class_name(target.cls).split()
            others = [class_name(o.cls).split() for o in scene.objects if o is not target]
            for key in ("all", f"{len(scene.objects)} objects"):
                c = counts[key]
                c[0] += 1
                c[1] += words[:1] == gold[:1]
                c[2] += words[1:2] == gold[1:2]
                c[3] += words[:2] in others
            labels = torch.as_tensor(labels)
            in_quadrant = quadrants == REGIONS.index(region)
            target_patches = (labels == target.cls) & in_quadrant
            groups = [target_patches, (labels != BACKGROUND_LABEL) & ~target_patches,
                      (labels == BACKGROUND_LABEL) & in_quadrant]  # fmt: skip
            image_positions = is_image[b].nonzero().flatten()
            for layer, weights in enumerate(out.attentions):
                # heads x 576: the attention of the last prompt token to the image
                row = weights[b, :, -1, image_positions].double().cpu()
                attention[layer] += torch.stack([row[:, g].sum(-1) for g in groups], dim=-1)
            labels_seen.append(labels)
            quadrants_seen.append(quadrants)
        vision = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        layer_features = vision.hidden_states[model.config.vision_feature_layer][:, 1:]
        projected = model.model.multi_modal_projector(layer_features)
        normed = model.model.language_model.layers[0].input_layernorm(projected)
        for name, x in (
            ("vision_feature_layer", layer_features),
            ("projector", projected),
            ("llm_layer0_norm", normed),
        ):
            feats[name].append(x.reshape(-1, x.shape[-1]).float().cpu())
    labels_all, quadrants_all = torch.cat(labels_seen), torch.cat(quadrants_seen)
    objects = labels_all != BACKGROUND_LABEL
    attention /= len(items)
    return {
        "questions": len(items),
        "region": {
            key: {
                "n": c[0],
                "colour": round(c[1] / c[0], 4),
                "shape": round(c[2] / c[0], 4),
                "names_another_object": round(c[3] / c[0], 4),
            }
            for key, c in sorted(counts.items())
        },  # fmt: skip
        "attention": {
            "groups": ["target_object", "other_objects", "quadrant_background"],
            "per_layer_head": [[[round(float(v), 4) for v in head] for head in layer] for layer in attention],
        },
        "features": {
            name: {
                "quadrant_share": _share(torch.cat(x)[objects], quadrants_all[objects]),
                "class_share": _share(torch.cat(x)[objects], labels_all[objects]),
            }
            for name, x in feats.items()
        },  # fmt: skip
    }


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"region lookups ({result['questions']} questions)")
    for column in ("scenes", "n", "colour", "shape", "names another object"):
        table.add_column(column)
    for key, r in result["region"].items():
        table.add_row(
            key, str(r["n"]), f"{r['colour']:.3f}", f"{r['shape']:.3f}", f"{r['names_another_object']:.3f}"
        )
    console.print(table)
    table = Table(
        title="attention of the last prompt token: target object / other objects / quadrant background"
    )
    table.add_column("layer")
    heads = len(result["attention"]["per_layer_head"][0])
    for h in range(heads):
        table.add_column(f"head {h}")
    for layer, row in enumerate(result["attention"]["per_layer_head"]):
        table.add_row(str(layer), *("/".join(f"{v:.2f}" for v in head) for head in row))
    console.print(table)
    table = Table(title="variance of object patches explained by")
    for column in ("features", "quadrant", "class"):
        table.add_column(column)
    for name, f in result["features"].items():
        table.add_row(name, f"{f['quadrant_share']:.3f}", f"{f['class_share']:.3f}")
    console.print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from vtprune.testbed import load_testbed

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="a saved testbed model folder (default: the shipped one)"
    )
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    model, processor = load_testbed(attn_implementation="eager", path=args.model)
    result = {
        "model": str(args.model or "testbed"),
        **diagnose(model.eval(), processor, args.scenes, args.batch_size),
    }
    print_report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
