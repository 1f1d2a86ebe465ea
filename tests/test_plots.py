"""Each plotting helper writes a valid, non-blank image of the expected pixel size (and a PDF where asked)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vtprune.analysis.plots import (
    assert_png_ok,
    attention_heatmap_overlay,
    heatmap,
    line_plot,
    new_figure,
    overlay_kept_patches,
    save_figure,
)
from vtprune.testing import random_image


def _is_pdf(path: Path) -> bool:
    return path.read_bytes()[:5] == b"%PDF-" and path.stat().st_size > 500


def test_save_figure_png_and_pdf(tmp_path: Path) -> None:
    fig, ax = new_figure((4, 3), dpi=100)
    ax.plot([0, 1, 2], [0, 1, 4])
    paths = save_figure(fig, tmp_path / "sub" / "curve")
    assert [p.name for p in paths] == ["curve.png", "curve.pdf"]
    assert assert_png_ok(paths[0], size=(400, 300)) == (400, 300)
    assert _is_pdf(paths[1])


def test_save_figure_rejects_suffix_and_empty_formats(tmp_path: Path) -> None:
    fig, _ = new_figure()
    with pytest.raises(ValueError, match="without its suffix"):
        save_figure(fig, tmp_path / "plot.png")
    with pytest.raises(ValueError, match="at least one"):
        save_figure(fig, tmp_path / "plot", formats=())


def test_line_plot(tmp_path: Path) -> None:
    series = {
        "fastv": ([576, 192, 128, 64], [85.9, 85.0, 83.1, 78.2]),
        "vispruner": ([576, 192, 128, 64], [85.9, 85.6, 85.2, 83.0]),
    }
    paths = line_plot(
        series,
        "visual tokens",
        "POPE F1",
        "accuracy vs tokens",
        tmp_path / "acc",
        invert_x=True,
        reference={"unpruned": 85.9},
        figsize=(5, 4),
        dpi=80,
    )
    assert assert_png_ok(paths[0], size=(400, 320))
    assert _is_pdf(paths[1])
    with pytest.raises(ValueError, match="equal length"):
        line_plot({"bad": ([1, 2], [1])}, "x", "y", "t", tmp_path / "bad")


def test_heatmap(tmp_path: Path) -> None:
    matrix = np.arange(12, dtype=float).reshape(3, 4)
    matrix[1, 2] = np.nan  # a missing run stays blank
    paths = heatmap(
        matrix,
        ["a", "b", "c"],
        ["1", "2", "3", "4"],
        tmp_path / "grid",
        title="heads",
        annotate=True,
        formats=("png",),
        figsize=(4, 3),
        dpi=100,
    )
    assert len(paths) == 1
    assert_png_ok(paths[0], size=(400, 300))
    with pytest.raises(ValueError, match="do not match"):
        heatmap(matrix, ["a"], ["1"], tmp_path / "bad")


def test_overlay_kept_patches(tmp_path: Path) -> None:
    image = random_image(0, size=112)
    fig, ax = new_figure((3, 3), dpi=100)
    overlay_kept_patches(image, (8, 8), [0, 9, 18, 27, 63, -1], ax, color="lime")
    (png,) = save_figure(fig, tmp_path / "kept", formats=("png",))
    assert_png_ok(png, size=(300, 300))
    # the dropped region is darker than the kept one: compare with all patches kept
    fig2, ax2 = new_figure((3, 3), dpi=100)
    overlay_kept_patches(image, (8, 8), range(64), ax2, dim=0.0, linewidth=0.0)
    (full,) = save_figure(fig2, tmp_path / "all", formats=("png",))
    from PIL import Image

    assert np.asarray(Image.open(png).convert("L")).mean() < np.asarray(Image.open(full).convert("L")).mean()
    with pytest.raises(ValueError, match="outside"):
        overlay_kept_patches(image, (8, 8), [64], ax)


def test_attention_heatmap_overlay(tmp_path: Path) -> None:
    image = random_image(1, size=112)
    fig, ax = new_figure((3, 3), dpi=100)
    scores = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)
    overlay = attention_heatmap_overlay(image, scores, ax)
    fig.colorbar(overlay, ax=ax)
    (png,) = save_figure(fig, tmp_path / "attn", formats=("png",))
    assert_png_ok(png, size=(300, 300))
    with pytest.raises(ValueError, match="square"):
        attention_heatmap_overlay(image, np.ones(10), ax)
    with pytest.raises(ValueError, match="NaN"):
        attention_heatmap_overlay(image, np.full(64, np.nan), ax)


def test_assert_png_ok_catches_blank_and_wrong_size(tmp_path: Path) -> None:
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (20, 10), "white").save(blank)
    with pytest.raises(AssertionError, match="blank"):
        assert_png_ok(blank)
    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8)).save(noisy)
    assert assert_png_ok(noisy, min_size=(20, 10)) == (20, 10)
    with pytest.raises(AssertionError, match="expected"):
        assert_png_ok(noisy, size=(10, 10))
    with pytest.raises(AssertionError, match="smaller"):
        assert_png_ok(noisy, min_size=(30, 10))
    not_png = tmp_path / "x.png"
    not_png.write_bytes(b"hello")
    with pytest.raises(AssertionError, match="not a PNG"):
        assert_png_ok(not_png)
