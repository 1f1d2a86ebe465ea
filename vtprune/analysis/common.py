"""What every analysis command shares: loading, prompts, one-sample prefill/generation, task samples,
the visual rows of a pruned sequence, [CLS] attention, LLM attention capture and JSON output.

Analyses run one sample at a time (batch of one, no padding): the numbers they report are per sample
(ranks, sink sets, kept sets) and a batch of one is what makes "row r of layer l" unambiguous.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.eval.errors import EvalInputError

IMAGE_PLACEHOLDER = "<image>"


# ------------------------------------------------------------------------------------------ the model


@dataclass
class AnalysisModel:
    """A LLaVA model, its processor and the prompt conventions of `vtprune eval` (template, preprocessing)."""

    model: Any
    processor: Any
    predictor: Any  # vtprune.eval.predictor.Predictor: prompt building and `pad` preprocessing
    adapter: Any  # a vtprune.models.base.ModelAdapter
    model_id: str = ""

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers)

    @property
    def num_heads(self) -> int:
        return int(self.adapter.config.text_config.num_attention_heads)

    @property
    def tokens_per_image(self) -> int:
        return int(self.adapter.tokens_per_image)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.adapter.grid)

    @property
    def image_token_id(self) -> int:
        return int(self.adapter.image_token_id)

    # --- prompts and inputs -------------------------------------------------------------------------
    def build_prompt(self, question: str, num_images: int = 1) -> str:
        """The prompt `vtprune eval` would build, with one image placeholder per image."""
        if num_images == 1:
            return self.predictor.build_prompt(question, True)
        if self.predictor.template == "vicuna_v1":
            from vtprune.eval.config import VICUNA_V1_SYSTEM

            return f"{VICUNA_V1_SYSTEM} USER: {(IMAGE_PLACEHOLDER + chr(10)) * num_images}{question} ASSISTANT:"
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def encode(self, question: str, images: list) -> Any:
        """Processor output for one sample (on the model's device, pixel values in the model's dtype)."""
        if not images:
            raise EvalInputError("the analysis commands need at least one image per sample")
        prompt = self.build_prompt(question, len(images))
        pixels = [self.predictor.prepare_image(img) for img in images]
        kwargs: dict[str, Any] = {"text": [prompt], "images": pixels, "return_tensors": "pt"}
        if self.predictor.preprocessing == "pad" and _pads_itself(self.processor):
            kwargs["do_pad"] = True
        inputs = self.processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # --- running ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, inputs: Any, max_new_tokens: int) -> str:
        """Greedy answer (num_beams=1, no sampling), special tokens stripped."""
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample, config.num_beams, config.max_new_tokens = False, 1, int(max_new_tokens)
        config.temperature = config.top_p = config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id
        out = self.model.generate(**inputs, generation_config=config)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()

    @torch.inference_mode()
    def prefill(self, inputs: Any, **kwargs: Any) -> Any:
        """One forward over the prompt (what a pruning method acts on); returns the model output."""
        return self.model(**inputs, **kwargs)

    def image_lengths(self, inputs: Any) -> list[int]:
        """Image tokens of each image of a one-sample prompt."""
        sizes = image_sizes_of(inputs)
        sources = self.adapter.token_sources(sizes) if sizes is not None else None
        if sources is not None:
            return [len(s) for s in sources]
        return [self.tokens_per_image] * int(inputs["pixel_values"].shape[0])

    def visual_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(V,) sequence positions of the image tokens of a one-sample prompt."""
        return torch.nonzero(input_ids[0] == self.image_token_id).flatten()


def _pads_itself(processor: Any) -> bool:
    """LLaVA's own image processor implements `expand2square` as `do_pad` (Predictor's rule)."""
    return type(processor.image_processor).__name__.startswith("LlavaImageProcessor")


def load_analysis_model(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    template: str = "hf",
    preprocessing: str = "crop",
) -> AnalysisModel:
    from vtprune.eval.predictor import Predictor
    from vtprune.loading import load_model, resolve_device_dtype
    from vtprune.models import adapter_for

    if template not in ("hf", "vicuna_v1"):
        raise EvalInputError(f"unknown template {template!r}; valid: hf, vicuna_v1")
    if preprocessing not in ("crop", "pad"):
        raise EvalInputError(f"unknown preprocessing {preprocessing!r}; valid: crop, pad")
    dev, dt = resolve_device_dtype(device, dtype)
    llava, processor = load_model(model, device=dev, dtype=dt, attn_implementation=attn_implementation)
    adapter = adapter_for(llava)
    predictor = Predictor(llava, processor, template=template, preprocessing=preprocessing, model_id=model)
    return AnalysisModel(llava, processor, predictor, adapter, model_id=model)


# ------------------------------------------------------------------------------------------ samples


@dataclass
class Sample:
    example: Any  # vtprune.eval.tasks.Example
    images: list  # decoded RGB PIL images


def load_task(task: str, dataset_path: str | None = None, split: str | None = None, parser: str | None = None):
    """A task of the eval registry (`vtprune tasks`), optionally on a local parquet file or folder."""
    from vtprune.eval.tasks import get_task

    if dataset_path is not None and not Path(dataset_path).expanduser().exists():
        raise EvalInputError(f"--dataset-path {dataset_path} does not exist")
    return get_task(task, dataset=dataset_path, split=split, parser=parser)


def iter_samples(task: Any, num_samples: int = -1, log: Callable[[str], None] | None = None) -> Iterator[Sample]:
    """Samples of `task` in dataset order (the first `num_samples`, -1 = all) that have an image.

    Samples the task marks as broken or text-only, and images that cannot be decoded, are skipped (and
    reported through `log`): every analysis needs the image's visual tokens.
    """
    from vtprune.eval.images import ImageDecodeError, decode_image

    if num_samples == 0 or num_samples < -1:
        raise EvalInputError(f"--num-samples must be >= 1 or -1 (all), got {num_samples}")
    examples = task.load(limit=None if num_samples == -1 else num_samples)
    for ex in examples:
        if ex.error is not None or ex.image_loader is None:
            if log:
                log(f"skipped {ex.uid}: {ex.error or 'no image'}")
            continue
        try:
            image = decode_image(ex.raw_image(), ex.base_dir)
        except ImageDecodeError as exc:
            if log:
                log(f"skipped {ex.uid}: {exc}")
            continue
        yield Sample(ex, [image])


def load_samples(task: Any, num_samples: int = -1, log: Callable[[str], None] | None = None) -> list[Sample]:
    samples = list(iter_samples(task, num_samples, log))
    if not samples:
        raise EvalInputError(f"task {task.name!r} gave no usable sample with an image")
    return samples


# ------------------------------------------------------------------------------------------ records


def active_kept(record: Any, layer: int, sample: int = 0) -> list[int] | None:
    """Kept original indices of the stage in force at decoder `layer` (None: nothing pruned there yet)."""
    kept = None
    if record is None:
        return None
    for stage in record.stages:
        first = 0 if stage.kind == "vision" else stage.prune_layer
        if first <= layer:
            kept = stage.kept[sample]
    return kept


def final_kept(record: Any, sample: int = 0) -> list[int]:
    """Original indices of the visual tokens the last LLM layer sees (merged/created tokens dropped)."""
    if record is None or not record.stages:
        raise RuntimeError("no pruning record: was the model pruned when it ran?")
    return [int(j) for j in record.stages[-1].kept[sample] if j >= 0]


def visual_rows(record: Any, layer: int, input_ids: torch.Tensor, image_token_id: int, lengths: list[int]) -> torch.Tensor:
    """(V_l,) rows of the visual tokens in the sequence decoder `layer` sees, for a one-sample prompt.

    `lengths` are the image tokens of each image of the prompt (576 each for LLaVA-1.5; LLaVA-NeXT's differ).
    vtprune keeps the text and replaces each image's block of tokens with the tokens it kept of that image, in
    order (created tokens right after them). So image i's block starts where it did in `input_ids`, moved left
    by the tokens removed from the images before it, and is as long as the number of tokens of image i the
    stage in force at `layer` kept (the record's `kept` list, original numbering, -1 = a created token counted
    with the image before it). Exact for one image per prompt and for methods that keep the same count of
    every image (every built-in method at batch size one).
    """
    ids = input_ids[0] if input_ids.dim() == 2 else input_ids
    positions = torch.nonzero(ids == image_token_id).flatten().tolist()
    if len(positions) != sum(lengths):
        raise ValueError(f"the prompt holds {len(positions)} image tokens, its images {sum(lengths)}")
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    starts = [positions[o] for o in offsets]
    counts = list(lengths)
    kept = active_kept(record, layer)
    if kept is not None:
        counts = [0] * len(starts)
        image = 0
        for j in kept:
            if j >= 0:
                image = max(i for i, o in enumerate(offsets) if o <= j)
            counts[image] += 1
    rows: list[int] = []
    removed = 0
    for start, count, length in zip(starts, counts, lengths, strict=True):
        first = start - removed
        rows.extend(range(first, first + count))
        removed += length - count
    return torch.tensor(rows, dtype=torch.long)


# ------------------------------------------------------------------------------------------ signals


def image_sizes_of(inputs: Any):
    """What says how each image became tokens: `image_sizes` (LLaVA-NeXT), `image_grid_thw` (Qwen-VL), or None."""
    sizes = inputs.get("image_sizes")
    return sizes if sizes is not None else inputs.get("image_grid_thw")


def image_size_kwargs(inputs: Any) -> dict:
    return {key: inputs[key] for key in ("image_sizes", "image_grid_thw") if inputs.get(key) is not None}


@torch.inference_mode()
def cls_attention(am: AnalysisModel, inputs: Any) -> torch.Tensor:
    """(N_images, P) head-mean [CLS] attention of the vision feature layer (what VisPruner scores with).

    Computed by `VisionSignals` itself from the tower's hidden states, so it is the number the methods see.
    """
    from vtprune.signals.context import VisionSignals

    sizes = image_sizes_of(inputs)
    out = am.adapter.encode_images(inputs["pixel_values"], **image_size_kwargs(inputs))
    hidden, projected = am.adapter.unpack_image_output(out)
    ids = inputs["input_ids"]
    sources = am.adapter.token_sources(sizes)
    source = image_crop = None
    if sources is not None:  # images of several crops: every token's crop and patch
        source = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True, padding_value=-1).to(hidden.device)
        image_crop = source[:, 0] // (hidden.shape[1] - 1)
        projected = torch.nn.utils.rnn.pad_sequence(list(projected), batch_first=True)
    n_img = projected.shape[0] // ids.shape[0]
    signals = VisionSignals(
        adapter=am.adapter,
        hidden=hidden,
        projected=projected,
        image_sample=torch.arange(projected.shape[0], device=hidden.device) // n_img,
        input_ids=ids,
        text_valid=ids != am.image_token_id,
        image_output=out,
        source=source,
        image_crop=image_crop,
    )
    return signals.cls_attention.float().cpu()


@contextmanager
def capture_last_token_attention(am: AnalysisModel, layers: list[int], visual: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """While active, each prefill forward fills `{layer: (H, V) float32}`: the attention probabilities of the
    last prompt token to the visual tokens at `visual` (positions), softmax over every key the row sees.

    Read from each layer's own post-RoPE q/k with `vtprune.signals.attention.add_capture` (no eager attention
    needed); the captures are always removed, and the attention interface restored if nothing else is
    pruning. The model must not be pruned meanwhile (its visual tokens would move).
    """
    import vtprune
    from vtprune import api
    from vtprune.signals import attention as attn_capture

    if vtprune.is_pruned(am.model):
        raise RuntimeError("unprune the model before capturing its unpruned attention")
    found: dict[int, torch.Tensor] = {}
    modules = {layer: am.adapter.layers[layer].self_attn for layer in layers}

    def make(layer: int):
        def capture(_module, query, key, scaling):
            if query.shape[2] < 2:  # a decode step
                return
            last = torch.full((query.shape[0], 1), query.shape[2] - 1, dtype=torch.long, device=query.device)
            probs = attn_capture.attention_rows(query, key, float(scaling), last, None)  # (B, H, 1, L)
            found[layer] = probs[0, :, 0, visual.to(probs.device)].float().cpu()

        return capture

    try:
        for layer, module in modules.items():
            attn_capture.add_capture(module, make(layer))
        yield found
    finally:
        for module in modules.values():
            attn_capture.remove_capture(module)
        attn_capture.release_if_unused(len(api._ACTIVE))


@contextmanager
def capture_outputs(modules: dict[Any, torch.nn.Module]) -> Iterator[dict[Any, torch.Tensor]]:
    """While active, `{key: (L, D) tensor}` holds the first multi-token output of each module per call of
    `found.clear()` (the prefill of a `generate`); forward hooks, always removed."""
    found: dict[Any, torch.Tensor] = {}
    handles = []

    def make(key):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if key not in found and out.dim() == 3 and out.shape[1] > 1:
                found[key] = out[0].detach()

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(make(key)))
        yield found
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ images


def image_as_seen(pixel_values: torch.Tensor, image_processor: Any) -> np.ndarray:
    """(H, W, 3) uint8: the tower's input with the processor's normalisation undone (after resize/crop/pad)."""
    x = pixel_values.detach().float().cpu().numpy()
    if x.ndim == 4:
        x = x[0]
    if getattr(image_processor, "do_normalize", True):
        mean = np.asarray(image_processor.image_mean, dtype=np.float64).reshape(-1, 1, 1)
        std = np.asarray(image_processor.image_std, dtype=np.float64).reshape(-1, 1, 1)
        x = x * std + mean
    if not getattr(image_processor, "do_rescale", True) or x.max() > 1.5:
        x = x / 255.0
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)


@dataclass
class ImageView:
    """One picture of an image's tokens: `token_cell` maps the original index of every token drawn here to
    its raster cell in `grid` (tokens not drawn, such as `image_newline`, are absent)."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    grid: tuple[int, int]
    token_cell: dict[int, int]

    def cells(self, kept: list[int]) -> list[int]:
        return [self.token_cell[k] for k in kept if k in self.token_cell]

    def heatmap(self, values: torch.Tensor) -> np.ndarray:
        """Per-token `values` laid on the grid (cells without a token: 0)."""
        out = np.zeros(self.grid[0] * self.grid[1])
        for token, cell in self.token_cell.items():
            out[cell] = float(values[token])
        return out


def image_views(am: AnalysisModel, inputs: Any) -> list[ImageView]:
    """The first image of `inputs` as `vtprune show` draws it: one patch grid (LLaVA-1.5), or, for an image
    of several crops (LLaVA-NeXT), its tiles put back together and its base view."""
    processor = am.processor.image_processor
    if inputs.get("image_grid_thw") is not None:  # Qwen-VL: one grid of merged tokens per image
        grid = inputs["image_grid_thw"][0]
        rows, cols = int(grid[1]) // am.adapter.merge, int(grid[2]) // am.adapter.merge
        seen = image_as_seen(am.adapter.first_frame(inputs["pixel_values"], grid), processor)
        return [ImageView("", seen, (rows, cols), {j: j for j in range(rows * cols)})]
    pixels = inputs["pixel_values"][0]
    rows, cols = am.grid
    sizes = inputs.get("image_sizes")
    sources = am.adapter.token_sources(sizes) if sizes is not None else None
    if sources is None:
        offset = am.tokens_per_image - rows * cols  # a [CLS] token of `full` features comes first
        return [ImageView("", image_as_seen(pixels, processor), am.grid, {offset + j: j for j in range(rows * cols)})]
    per_crop = rows * cols
    base_cells: dict[int, int] = {}
    tile_cells: dict[int, int] = {}
    nh, nw = am.adapter.tile_grid(sizes[0].tolist())
    for token, source in enumerate(sources[0].tolist()):
        if source < 0:
            continue  # image_newline: no patch
        crop, patch = divmod(source, per_crop)
        if crop == 0:
            base_cells[token] = patch
        else:
            (tile_row, tile_col), (r, c) = divmod(crop - 1, nw), divmod(patch, cols)
            tile_cells[token] = (tile_row * rows + r) * (nw * cols) + tile_col * cols + c
    base = ImageView("base view", image_as_seen(pixels[0], processor), am.grid, base_cells)
    if not tile_cells:
        return [base]
    size = pixels.shape[-1]
    tiles = pixels[1 : 1 + nh * nw].reshape(nh, nw, 3, size, size).permute(2, 0, 3, 1, 4)
    mosaic = image_as_seen(tiles.reshape(3, nh * size, nw * size), processor)
    return [ImageView("tiles", mosaic, (nh * rows, nw * cols), tile_cells), base]


# ------------------------------------------------------------------------------------------ small things


def histogram(values: Any, bins: int = 30, log: bool = False) -> dict[str, list[float]]:
    """`{"edges", "counts"}` of a numpy histogram (log-spaced edges for positive data when `log`)."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return {"edges": [], "counts": []}
    if log and (arr > 0).any():
        pos = arr[arr > 0]
        lo, hi = pos.min(), pos.max()
        edges = np.geomspace(lo, hi if hi > lo else lo * 10, bins + 1)
        counts, edges = np.histogram(np.clip(arr, lo, None), bins=edges)
    else:
        counts, edges = np.histogram(arr, bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (NaN/inf become null, tensors and arrays become lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=1) + "\n", encoding="utf-8")
    return path


def settings(am: AnalysisModel, **extra: Any) -> dict[str, Any]:
    """What a result file needs to be reproduced: model, prompt conventions, dtype, device, and `extra`."""
    import transformers

    import vtprune

    return {
        "model": am.model_id,
        "template": am.predictor.template,
        "preprocessing": am.predictor.preprocessing,
        "dtype": str(am.model.dtype).replace("torch.", ""),
        "device": str(am.device),
        "attn_implementation": am.adapter.attn_implementation,
        "vtprune": getattr(vtprune, "__version__", "unknown"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        **extra,
    }
