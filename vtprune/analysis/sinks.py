"""`vtprune analyze sinks`: attention-sink statistics of the visual tokens over a dataset
(docs/ANALYSIS.md).

Two kinds of sinks, both computed on the unpruned prefill of each sample (its first image):

* **vision sinks** — patches whose head-mean [CLS] attention in the vision feature layer exceeds
  `vision_threshold` (0.02, `vispruner_nosink`'s `attention_sink_threshold`; `signals.debias.attention_mass_sinks`);
* **LLM sinks** — visual tokens with massive activations, φ(x) = max_{d∈D} |RMSNorm(x)_d| > τ (τ = 20) on
  the hidden state entering decoder `layer` (default 2), the rule of Kang et al., arXiv 2503.03321
  (`signals.debias.massive_activation_sinks`).
  D is LLaMA-2's known sink dimensions for hidden size 4096 / 5120 (LLaVA-1.5-7B / 13B) and otherwise
  detected per sample (the two channels with the largest peak).

For both: how many per image, where (a frequency map over the patch grid: the fraction of images in which
a patch is a sink), and how often each method in `methods` keeps them (kept sinks / sinks, next to the
method's overall kept fraction — a method that ignores sinks keeps them at its overall rate). The attention
of the last prompt token at `layer` (head mean, captured from the layer's own q/k) tells how much of the
text's attention to the image lands on sinks.

Outputs: `sinks.json`, `sinks_overlay.png` (frequency maps over the first image, and that image's sinks
outlined) and `sinks_histogram.png/.pdf` ([CLS] attention and φ distributions with their thresholds, sinks
per image, keep rates per method).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vtprune.analysis.common import (
    AnalysisModel,
    Sample,
    capture_last_token_attention,
    cls_attention,
    final_kept,
    histogram,
    image_views,
    settings,
    write_json,
)
from vtprune.analysis.plots import attention_heatmap_overlay, overlay_kept_patches, save_figure
from vtprune.eval.errors import EvalInputError
from vtprune.signals.debias import (
    LLAMA2_SINK_DIMS,
    attention_mass_sinks,
    massive_activation_sinks,
    rms_normalize,
)

KNOWN_DIMS = {4096: LLAMA2_SINK_DIMS["llama-2-7b"], 5120: LLAMA2_SINK_DIMS["llama-2-13b"]}


def resolve_sink_dims(spec: str, hidden_size: int) -> tuple[int, ...] | None:
    """`auto` (LLaMA-2's dims for 4096/5120, else detect), `detect` (None), a known model name, or `d1,d2`."""
    spec = spec.strip().lower()
    if spec == "auto":
        return KNOWN_DIMS.get(hidden_size)
    if spec == "detect":
        return None
    if spec in LLAMA2_SINK_DIMS:
        return LLAMA2_SINK_DIMS[spec]
    try:
        dims = tuple(int(d) for d in spec.split(",") if d.strip())
    except ValueError as exc:
        raise EvalInputError(
            f"--sink-dims {spec!r}: use auto, detect, {', '.join(LLAMA2_SINK_DIMS)} or comma-separated integers"
        ) from exc
    if not dims or max(dims) >= hidden_size or min(dims) < 0:
        raise EvalInputError(f"--sink-dims {spec!r} out of range for hidden size {hidden_size}")
    return dims


def phi(hidden: torch.Tensor, dims: tuple[int, ...] | None, num_dims: int = 2) -> torch.Tensor:
    """(N,) φ values of (N, D) hidden states, with the same dimension choice as `massive_activation_sinks`."""
    xn = rms_normalize(hidden[None]).abs()[0]
    if dims is None:
        idx = torch.topk(xn.amax(dim=0), num_dims).indices
        return xn[:, idx].amax(-1)
    return xn[:, list(dims)].amax(-1)


def _rate(kept: int, total: int) -> float | None:
    return kept / total if total else None


DYNAMIC_MAP_GRID = (8, 8)  # map cells for models whose images have their own token grids (Qwen-VL)


def _rescaled_cell(cell: int, grid, target) -> int:
    """The cell of `target` covering the centre of raster cell `cell` of `grid`."""
    r, c = divmod(cell, grid[1])
    return int((r + 0.5) * target[0] / grid[0]) * target[1] + int((c + 0.5) * target[1] / grid[1])


def run_sinks(
    am: AnalysisModel,
    samples: list[Sample],
    output: str | Path,
    *,
    methods: list[str],
    keep: int | float | None,
    params: dict[str, dict[str, Any]],
    vision_threshold: float = 0.02,
    layer: int = 2,
    tau: float = 20.0,
    sink_dims: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    import vtprune

    if not 0 <= layer < am.num_layers:
        raise EvalInputError(f"--layer {layer} is outside the LLM's layers (valid: 0..{am.num_layers - 1})")
    for method in methods:
        vtprune.get_method(method, keep=keep, **params.get(method, {}))
    hidden_size = int(am.adapter.config.text_config.hidden_size)
    dims = resolve_sink_dims(sink_dims, hidden_size)
    out_dir = Path(output)
    # Maps are drawn on one patch grid per image: LLaVA-1.5's, or LLaVA-NeXT's base view (its tiles and
    # newlines count in every statistic but are not mapped).
    # Qwen-VL: every image has its own token grid; the maps use a fixed grid and each token its relative place.
    rows, cols = am.grid if all(am.grid) else DYNAMIC_MAP_GRID
    n_patch = rows * cols
    offset = 0 if am.adapter.variable_tokens else am.tokens_per_image - n_patch  # `full` features: [CLS] first
    vision_freq = np.zeros(n_patch)
    llm_freq = np.zeros(n_patch)
    attention_map = np.zeros(n_patch)
    cls_values: list[np.ndarray] = []
    phi_values: list[np.ndarray] = []
    vision_counts: list[int] = []
    llm_counts: list[int] = []
    mass = {"image": [], "llm_sinks": [], "vision_sinks": []}
    per_token = {"llm_sink": [], "llm_other": [], "vision_sink": [], "vision_other": []}
    kept_stats = {m: {"vision_kept": 0, "vision_total": 0, "llm_kept": 0, "llm_total": 0, "kept": 0, "total": 0} for m in methods}
    example_figure = None
    for n, sample in enumerate(samples, start=1):
        inputs = am.encode(sample.example.question, sample.images[:1])
        p = am.image_lengths(inputs)[0]  # image tokens (LLaVA-1.5: `offset` + patches)
        map_view = image_views(am, inputs)[-1]
        cells = [map_view.token_cell.get(offset + j) for j in range(p - offset)]  # token -> cell or None
        if tuple(map_view.grid) != (rows, cols):
            cells = [None if c is None else _rescaled_cell(c, map_view.grid, (rows, cols)) for c in cells]
        cls = cls_attention(am, inputs)[0][: p - offset]  # (tokens,)
        vision_sinks = attention_mass_sinks(cls[None], vision_threshold)[0]
        visual = am.visual_positions(inputs["input_ids"])[:p]
        with capture_last_token_attention(am, [layer], visual) as found:
            out = am.prefill(inputs, output_hidden_states=True)
        hidden = out.hidden_states[layer][0, visual.to(out.hidden_states[layer].device)].float().cpu()
        hidden_patches = hidden[offset:]
        llm_sinks = massive_activation_sinks(hidden_patches[None], dims, tau)[0]
        phis = phi(hidden_patches, dims)
        attn = found[layer].mean(0)[offset:]  # (P,) head-mean last-token attention on each patch
        for j, cell in enumerate(cells):
            if cell is not None:
                vision_freq[cell] += float(vision_sinks[j])
                llm_freq[cell] += float(llm_sinks[j])
                attention_map[cell] += float(attn[j])
        cls_values.append(cls.numpy())
        phi_values.append(phis.numpy())
        vision_counts.append(int(vision_sinks.sum()))
        llm_counts.append(int(llm_sinks.sum()))
        image_mass = float(attn.sum())
        mass["image"].append(image_mass)
        mass["llm_sinks"].append(float(attn[llm_sinks].sum()) / image_mass if image_mass > 0 else 0.0)
        mass["vision_sinks"].append(float(attn[vision_sinks].sum()) / image_mass if image_mass > 0 else 0.0)
        per_token["llm_sink"] += attn[llm_sinks].tolist()
        per_token["llm_other"] += attn[~llm_sinks].tolist()
        per_token["vision_sink"] += attn[vision_sinks].tolist()
        per_token["vision_other"] += attn[~vision_sinks].tolist()
        for method in methods:
            vtprune.prune(am.model, method, keep=keep, **params.get(method, {}))
            try:
                am.prefill(inputs)
                record = vtprune.last_record(am.model)
            finally:
                vtprune.unprune(am.model)
            kept = torch.zeros(p - offset, dtype=torch.bool)
            kept[[k - offset for k in final_kept(record) if offset <= k < p]] = True
            stats = kept_stats[method]
            stats["vision_kept"] += int((kept & vision_sinks).sum())
            stats["vision_total"] += int(vision_sinks.sum())
            stats["llm_kept"] += int((kept & llm_sinks).sum())
            stats["llm_total"] += int(llm_sinks.sum())
            stats["kept"] += int(kept.sum())
            stats["total"] += p - offset
        if example_figure is None:
            example_figure = {
                "image": map_view.image,
                "vision_sinks": [cells[j] for j in torch.nonzero(vision_sinks).flatten().tolist() if cells[j] is not None],
                "llm_sinks": [cells[j] for j in torch.nonzero(llm_sinks).flatten().tolist() if cells[j] is not None],
                "id": sample.example.uid,
            }
        if log:
            log(f"sample {n}/{len(samples)}: {vision_counts[-1]} vision sinks, {llm_counts[-1]} LLM sinks")

    n_img = len(samples)
    vision_freq /= n_img
    llm_freq /= n_img
    attention_map /= n_img
    all_cls = np.concatenate(cls_values)
    all_phi = np.concatenate(phi_values)
    first_v, first_l = set(example_figure["vision_sinks"]), set(example_figure["llm_sinks"])
    first_jaccard = len(first_v & first_l) / len(first_v | first_l) if first_v | first_l else None

    def mean(values):
        return float(np.mean(values)) if len(values) else None

    methods_out = {
        m: {
            "keep": keep,
            "params": params.get(m, {}),
            "vision_sinks_kept": s["vision_kept"],
            "vision_sinks_total": s["vision_total"],
            "vision_sink_keep_rate": _rate(s["vision_kept"], s["vision_total"]),
            "llm_sinks_kept": s["llm_kept"],
            "llm_sinks_total": s["llm_total"],
            "llm_sink_keep_rate": _rate(s["llm_kept"], s["llm_total"]),
            "overall_keep_rate": _rate(s["kept"], s["total"]),
        }
        for m, s in kept_stats.items()
    }
    data = {
        "settings": settings(am, methods=methods, keep=keep, vision_threshold=vision_threshold, layer=layer,
                             tau=tau, sink_dims=list(dims) if dims is not None else "detected per sample"),
        "num_images": n_img,
        "grid": [rows, cols],
        "vision": {
            "threshold": vision_threshold,
            "per_image_counts": vision_counts,
            "mean_count": mean(vision_counts),
            "frequency_map": vision_freq.reshape(rows, cols),
            "cls_attention_histogram": histogram(all_cls, log=True),
            "cls_attention_max": float(all_cls.max()),
        },
        "llm": {
            "layer": layer,
            "tau": tau,
            "dims": list(dims) if dims is not None else None,
            "per_image_counts": llm_counts,
            "mean_count": mean(llm_counts),
            "frequency_map": llm_freq.reshape(rows, cols),
            "phi_histogram": histogram(all_phi),
            "phi_max": float(all_phi.max()),
        },
        "attention": {
            "query": "last prompt token, head mean",
            "layer": layer,
            "mean_image_mass": mean(mass["image"]),
            "mean_share_on_llm_sinks": mean(mass["llm_sinks"]),
            "mean_share_on_vision_sinks": mean(mass["vision_sinks"]),
            "mean_per_llm_sink_token": mean(per_token["llm_sink"]),
            "mean_per_other_token_llm": mean(per_token["llm_other"]),
            "mean_per_vision_sink_token": mean(per_token["vision_sink"]),
            "mean_per_other_token_vision": mean(per_token["vision_other"]),
            "mean_map": attention_map.reshape(rows, cols),
        },
        "first_image": {
            "id": example_figure["id"],
            "vision_sinks": example_figure["vision_sinks"],
            "llm_sinks": example_figure["llm_sinks"],
            "jaccard_vision_llm": first_jaccard,
        },
        "methods": methods_out,
    }
    overlay = _overlay_figure(example_figure, vision_freq, llm_freq, (rows, cols), vision_threshold, layer, tau)
    (overlay_png,) = save_figure(overlay, out_dir / "sinks_overlay", formats=("png",))
    hist = _histogram_figure(all_cls, all_phi, vision_counts, llm_counts, methods_out, vision_threshold, tau, layer)
    hist_files = save_figure(hist, out_dir / "sinks_histogram")
    data["figures"] = [str(overlay_png), *map(str, hist_files)]
    write_json(out_dir / "sinks.json", data)
    return data


def _figure(size: tuple[float, float], dpi: int = 100) -> Figure:
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _overlay_figure(example, vision_freq, llm_freq, grid, threshold, layer, tau) -> Figure:
    fig = _figure((13.0, 3.8))
    axes = fig.subplots(1, 4)
    image = example["image"]
    for ax, freq, title in (
        (axes[0], vision_freq, f"vision sinks ([CLS] attn > {threshold:g})\nfrequency over images"),
        (axes[1], llm_freq, f"LLM sinks (φ > {tau:g}, layer {layer})\nfrequency over images"),
    ):
        shown = attention_heatmap_overlay(image, freq, ax, grid=grid, alpha=0.6, cmap="magma")
        shown.set_clim(0.0, 1.0)  # a fraction of images: one scale for both maps
        fig.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=9)
    overlay_kept_patches(image, grid, example["vision_sinks"], axes[2], color="cyan", dim=0.3)
    axes[2].set_title(f"{example['id']}: {len(example['vision_sinks'])} vision sinks", fontsize=9)
    overlay_kept_patches(image, grid, example["llm_sinks"], axes[3], color="yellow", dim=0.3)
    axes[3].set_title(f"{example['id']}: {len(example['llm_sinks'])} LLM sinks", fontsize=9)
    return fig


def _histogram_figure(cls_values, phi_values, vision_counts, llm_counts, methods, threshold, tau, layer) -> Figure:
    fig = _figure((11.0, 7.5))
    (a, b), (c, d) = fig.subplots(2, 2)
    a.hist(cls_values, bins=40, color="tab:blue", log=True)
    a.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    a.set(title="[CLS] attention per patch", xlabel="head-mean [CLS] attention", ylabel="patches")
    a.legend()
    b.hist(phi_values, bins=40, color="tab:orange", log=True)
    b.axvline(tau, color="red", linestyle="--", label=f"τ = {tau:g}")
    b.set(title=f"φ of visual tokens entering layer {layer}", xlabel="φ = max_d |RMSNorm(x)_d|", ylabel="tokens")
    b.legend()
    top = max([*vision_counts, *llm_counts, 1])
    bins = np.arange(-0.5, top + 1.5, max(1, (top + 1) // 30))
    c.hist([vision_counts, llm_counts], bins=bins, label=["vision sinks", "LLM sinks"])
    c.set(title="sinks per image", xlabel="sinks", ylabel="images")
    c.legend()
    names = list(methods)
    x = np.arange(len(names))
    width = 0.27
    for i, (key, label) in enumerate(
        (("vision_sink_keep_rate", "vision sinks"), ("llm_sink_keep_rate", "LLM sinks"), ("overall_keep_rate", "all patches"))
    ):
        values = [methods[m][key] if methods[m][key] is not None else np.nan for m in names]
        d.bar(x + (i - 1) * width, values, width, label=label)
    d.set_xticks(x, labels=names)
    d.set_ylim(0, 1.05)
    d.set(title="fraction kept by each method", ylabel="kept / present")
    d.legend(fontsize=8)
    return fig
