"""Small matplotlib helpers shared by `vtprune sweep | bench | show | analyze`.

Figures are built with the object-oriented API on an Agg canvas (`new_figure`), never through `pyplot`:
the library then works on headless machines and in worker processes, and never changes the backend of a
user's notebook. Saved images keep the figure's exact pixel size (figsize × dpi; no `bbox_inches="tight"`),
which is what makes `assert_png_ok` checks in tests deterministic.

Patch overlays assume LLaVA's raster order: visual token j sits at row j // grid_w, column j % grid_w of the
patch grid (kept indices are in original numbering, as in a `PruneRecord`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

__all__ = [
    "assert_png_ok",
    "attention_heatmap_overlay",
    "heatmap",
    "line_plot",
    "new_figure",
    "overlay_kept_patches",
    "save_figure",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_figure(
    figsize: tuple[float, float] = (6.0, 4.0), dpi: int = 100, **subplot_kw: Any
) -> tuple[Figure, Axes]:
    """A figure with one axes on an Agg canvas (no pyplot state, so nothing leaks between plots)."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(**subplot_kw)
    return fig, ax


def save_figure(
    fig: Figure,
    path_without_suffix: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    *,
    dpi: int | None = None,
) -> list[Path]:
    """Write `fig` once per format as `<path>.<format>`, creating parent folders; returns the paths.

    The path must not carry a suffix of its own: one stem, several formats (PNG for reports, PDF for
    papers), so a caller cannot end up with `plot.png.pdf`.
    """
    stem = Path(path_without_suffix)
    if not formats:
        raise ValueError("formats must name at least one image format, e.g. ('png',)")
    if stem.suffix.lower().lstrip(".") in {f.lower() for f in formats}:
        raise ValueError(f"pass the path without its suffix, got {stem}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(out, format=fmt, dpi=dpi if dpi is not None else fig.dpi)
        written.append(out)
    return written


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: str | Path,
    invert_x: bool = False,
    *,
    formats: Sequence[str] = ("png", "pdf"),
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
    reference: Mapping[str, float] | None = None,
) -> list[Path]:
    """One line per named series (e.g. accuracy vs. kept tokens, one line per method), saved to `path`.

    `invert_x=True` puts large budgets on the left, the way pruning papers draw "fewer tokens →". Optional
    `reference` draws horizontal dashed lines (e.g. {"unpruned": 85.9}).
    """
    if not series:
        raise ValueError("line_plot needs at least one series")
    fig, ax = new_figure(figsize, dpi)
    for name, (x, y) in series.items():
        x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x_arr.shape != y_arr.shape or x_arr.ndim != 1:
            raise ValueError(
                f"series {name!r}: x and y must be 1-D of equal length, got {x_arr.shape}, {y_arr.shape}"
            )
        order = np.argsort(x_arr, kind="stable")
        ax.plot(x_arr[order], y_arr[order], marker="o", label=str(name))
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey", label=str(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if invert_x:
        ax.invert_xaxis()
    ax.legend()
    return save_figure(fig, path, formats)


def heatmap(
    matrix: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    colorbar_label: str = "",
    annotate: bool = False,
    fmt: str = "{:.2f}",
    vmin: float | None = None,
    vmax: float | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> list[Path]:
    """A labelled matrix plot (head maps: layers × heads; results: methods × budgets), saved to `path`.

    `annotate=True` writes each value with `fmt` (sensible up to a few hundred cells). NaN cells are left
    blank, so missing runs in a results grid show as gaps rather than as a colour.
    """
    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {data.shape}")
    if len(row_labels) != data.shape[0] or len(col_labels) != data.shape[1]:
        raise ValueError(
            f"labels ({len(row_labels)} rows, {len(col_labels)} cols) do not match matrix shape {data.shape}"
        )
    if figsize is None:
        figsize = (min(2.0 + 0.5 * data.shape[1], 16.0), min(1.5 + 0.4 * data.shape[0], 16.0))
    fig, ax = new_figure(figsize, dpi)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(data.shape[1]), labels=[str(c) for c in col_labels])
    ax.set_yticks(range(data.shape[0]), labels=[str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if annotate:
        lo, hi = image.get_clim()
        mid = (lo + hi) / 2
        for (r, c), value in np.ndenumerate(data):
            if np.isfinite(value):
                ax.text(
                    c,
                    r,
                    fmt.format(value),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value < mid else "black",
                )
    return save_figure(fig, path, formats)


def _image_array(image: Any) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an image (PIL or H×W[×C] array), got shape {arr.shape}")
    return arr


def overlay_kept_patches(
    image: Any,
    grid: tuple[int, int],
    kept_indices: Sequence[int] | np.ndarray,
    ax: Axes,
    color: str = "red",
    *,
    dim: float = 0.65,
    linewidth: float = 0.8,
) -> Axes:
    """Draw `image` with the patches not kept darkened and the kept ones outlined in `color`.

    `grid` = (rows, cols) of the patch grid (24×24 for LLaVA-1.5) and `kept_indices` are raster indices
    into it. Pass the image as the model saw it (after the processor's pad or crop): the grid is laid over
    the whole picture. Indices of merged/extra tokens (−1 in a `PruneRecord`) are ignored.
    """
    rows, cols = grid
    if rows <= 0 or cols <= 0:
        raise ValueError(f"grid must be positive (rows, cols), got {grid}")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim is an opacity in [0, 1], got {dim}")
    kept = np.asarray(list(kept_indices), dtype=int).reshape(-1)
    kept = kept[kept >= 0]
    if kept.size and kept.max() >= rows * cols:
        raise ValueError(f"kept index {kept.max()} outside a {rows}×{cols} grid")
    arr = _image_array(image)
    height, width = arr.shape[:2]
    ax.imshow(arr, extent=(0, width, height, 0), interpolation="nearest")
    mask = np.ones(rows * cols, dtype=bool)
    mask[kept] = False
    shade = np.zeros((rows, cols, 4))
    shade[..., 3] = mask.reshape(rows, cols) * dim  # black with alpha on dropped patches
    ax.imshow(shade, extent=(0, width, height, 0), interpolation="nearest")
    ph, pw = height / rows, width / cols
    boxes = [Rectangle(((j % cols) * pw, (j // cols) * ph), pw, ph) for j in np.unique(kept)]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=color, linewidth=linewidth))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return ax


def attention_heatmap_overlay(
    image: Any,
    scores: Any,
    ax: Axes,
    *,
    grid: tuple[int, int] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> AxesImage:
    """Draw `image` with per-patch `scores` (length grid_h·grid_w, raster order) as a translucent heatmap.

    The grid is taken square unless given. Scores are shown as they are (no normalisation) so a colorbar
    attached to the returned `AxesImage` reads in the score's own units.
    """
    values = np.asarray(scores.detach().cpu().float() if hasattr(scores, "detach") else scores, dtype=float)
    values = values.reshape(-1)
    if grid is None:
        side = int(round(np.sqrt(values.size)))
        if side * side != values.size:
            raise ValueError(f"{values.size} scores are not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != values.size:
        raise ValueError(f"{values.size} scores do not fill a {rows}×{cols} grid")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores contain NaN or inf")
    arr = _image_array(image)
    height, width = arr.shape[:2]
    ax.imshow(arr, extent=(0, width, height, 0))
    overlay = ax.imshow(
        values.reshape(rows, cols),
        extent=(0, width, height, 0),
        cmap=cmap,
        alpha=alpha,
        interpolation="nearest",
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return overlay


def assert_png_ok(
    path: str | Path, min_size: tuple[int, int] = (1, 1), size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Test helper: `path` is a valid PNG, at least `min_size` (and exactly `size`) pixels (w, h), not blank.

    "Not blank" means the pixel values vary (std > 0): a figure whose drawing silently failed is a single
    colour. Returns the (width, height) found.
    """
    from PIL import Image

    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    with path.open("rb") as fh:
        assert fh.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        img.verify()  # checks chunk CRCs; the image must be reopened afterwards
    with Image.open(path) as img:
        found = img.size
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    assert found[0] >= min_size[0] and found[1] >= min_size[1], f"{path}: {found} smaller than {min_size}"
    if size is not None:
        assert found == tuple(size), f"{path}: size {found}, expected {tuple(size)}"
    assert pixels.std() > 0, f"{path} is blank (a single colour)"
    return found
