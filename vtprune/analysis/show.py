"""`vtprune show`: which patches each method keeps on one image, side by side, with the [CLS] attention map.

One panel per method: the image as the model saw it (after the processor's resize / crop / pad, the
normalisation undone) with the dropped patches darkened and the kept ones outlined; under it the method's
answer. A last panel overlays the vision tower's head-mean [CLS] attention (the score VisPruner and
VisionZip rank with) and shows the unpruned model's answer. With several images in the prompt the first
image is drawn. The kept set of a method is what the last LLM layer sees (the final stage of its record).
A LLaVA-NeXT image is drawn in two rows: its tiles put back together (the unpadded high-resolution grid;
rows or columns that only covered the letterbox are no tokens and stay dark) and its base view.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vtprune.analysis.common import (
    AnalysisModel,
    cls_attention,
    final_kept,
    image_views,
    settings,
    write_json,
)
from vtprune.analysis.plots import attention_heatmap_overlay, overlay_kept_patches, save_figure

PANEL_INCHES = (3.2, 4.2)  # width, height of one panel; the PNG is (320·panels) × 420 px at dpi 100
ROW_INCHES = 3.4  # each further row (LLaVA-NeXT: the base view under the tiles)
COLORS = ("red", "lime", "cyan", "magenta", "yellow", "orange", "deepskyblue", "white")


def _caption(text: str, width: int = 30, lines: int = 4) -> str:
    wrapped = textwrap.wrap(text.replace("\n", " ") or "(empty answer)", width=width)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return "\n".join(wrapped)


def run_show(
    am: AnalysisModel,
    images: list,
    prompt: str,
    methods: list[str],
    keep: int | float | None,
    params: dict[str, dict[str, Any]],
    output: str | Path,
    *,
    max_new_tokens: int = 64,
    dpi: int = 100,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every method on one prompt, draw `output` (PNG) and write the numbers to `<output stem>.json`."""
    import vtprune

    if not methods:
        raise ValueError("--methods is empty")
    for method in methods:  # fail on a bad name or parameter before any model work
        vtprune.get_method(method, keep=keep, **params.get(method, {}))
    output = Path(output)
    stem = output.with_name(output.stem) if output.suffix.lower() == ".png" else output
    inputs = am.encode(prompt, images)
    views = image_views(am, inputs)
    p = int((inputs["input_ids"][0] == am.image_token_id).sum()) // len(images)
    cls = cls_attention(am, inputs)[0]  # first image
    # Qwen-VL towers have no [CLS]: the map is the attention each patch receives (the adapter's substitute)
    heat_name = "[CLS] attention" if am.adapter.has_cls else "received attention (no [CLS])"
    unpruned = am.generate(inputs, max_new_tokens)
    results: dict[str, Any] = {}
    for method in methods:
        vtprune.prune(am.model, method, keep=keep, **params.get(method, {}))
        try:
            answer = am.generate(inputs, max_new_tokens)
            record = vtprune.last_record(am.model)
        finally:
            vtprune.unprune(am.model)
        kept = final_kept(record)
        results[method] = {
            "answer": answer,
            "params": record.params,
            "kept_first_image": views[0].cells(kept),
            "kept": kept,
            "tokens_after_pruning": record.tokens_after_pruning[0],
            "layer_avg_tokens": record.layer_avg_tokens[0],
            **({"kept_views": {view.name: view.cells(kept) for view in views}} if len(views) > 1 else {}),
            "stages": [
                {"name": s.name, "kind": s.kind, "prune_layer": s.prune_layer, "count": s.counts[0], "extra": s.extra}
                for s in record.stages
            ],
        }
        if log:
            log(f"{method}: kept {len(kept)} of {record.visual_tokens} visual tokens; answer: {answer!r}")

    panels = len(methods) + 1
    fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1] + ROW_INCHES * (len(views) - 1)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(views), panels, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.80 if len(views) == 1 else 0.88, bottom=0.12, wspace=0.06)
    for row, view in enumerate(views):
        label = f"{view.name}: " if len(views) > 1 else ""
        for i, method in enumerate(methods):
            ax = axes[row, i]
            cells = view.cells(results[method]["kept"])
            overlay_kept_patches(view.image, view.grid, cells, ax, color=COLORS[i % len(COLORS)])
            title = f"{label}{len(cells)} / {len(view.token_cell)} patches kept"
            ax.set_title(f"{method}\n{title}" if row == 0 else title, fontsize=9)
            if row == len(views) - 1:
                ax.text(0.5, -0.03, _caption(results[method]["answer"]), transform=ax.transAxes, ha="center",
                        va="top", fontsize=8)
        ax = axes[row, -1]
        heat = view.heatmap(cls)
        attention_heatmap_overlay(view.image, heat, ax, grid=view.grid)
        ax.set_title(f"{label}{heat_name}" + (f"\n(max {float(heat.max()):.3g})" if row == 0 else ""), fontsize=9)
        if row == len(views) - 1:
            ax.text(0.5, -0.03, _caption(f"unpruned: {unpruned}"), transform=ax.transAxes, ha="center", va="top",
                    fontsize=8)
    fig.suptitle(_caption(f"prompt: {prompt}", width=40 * panels, lines=1), y=0.985, fontsize=9)
    (png,) = save_figure(fig, stem, formats=("png",))
    seen = views[0].image
    grid = views[0].grid
    data = {
        "settings": settings(am, prompt=prompt, keep=keep, methods=methods, max_new_tokens=max_new_tokens),
        "image_size_seen": [int(seen.shape[1]), int(seen.shape[0])],
        "grid": list(grid),
        "visual_tokens_per_image": p,
        "num_images": len(am.image_lengths(inputs)),
        "unpruned_answer": unpruned,
        "cls_attention": cls.tolist(),
        "attention_map": heat_name,
        "methods": results,
        "figure": str(png),
    }
    write_json(stem.with_name(stem.name + ".json"), data)
    return data
