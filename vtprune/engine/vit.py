"""A "vit" stage: merging patches inside the vision tower (iLLaVA, FlowCut).

At each listed CLIP layer l the merge happens after the attention sub-block and before the MLP, exactly:
CLIPEncoderLayer computes h = x + attn(ln1(x)); out = h + mlp(ln2(h)). A pre-hook on l's `layer_norm2`
receives h and asks the method's `merge_vit` (scored with l's captured q/k/v). When it merges h to h' (fewer
tokens), the hook hands ln2 a one-token stub (so the layer's own MLP costs nothing; its output is discarded)
and a forward hook on layer l, run before any other (transformers' hidden-state recorder included), returns
h' + mlp(ln2(h')). When `merge_vit` returns None (nothing removed at this layer: FlowCut's layers that only
update their scores, or every image already at its budget), the layer runs untouched: no stub, no gather, no
bookkeeping. CLIP layers are non-causal, have no cache and get the mask None, so later layers simply see fewer
tokens; when an adaptive merge (FlowCut) leaves images with different counts, the rows are padded and the
following layers get an additive key mask (`_mask_hook`, built once after each merge and reused until the
next) until the counts are equal again. The original patch index of each survivor rides on the tower's output
object to the prefill (`tag_output`, `original_index`), with, for adaptive merges, the patches per image after
each listed layer (a layer that removed nothing repeats the count before it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vtprune import compat
from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, ModelInfo, Stage
from vtprune.signals.context import Captured, ViTLayerSignals

AddCapture = Callable[..., None]  # (module, callback, with_value) -> None, removed with the session


def check_vit_stage(method: Method, stage: Stage, adapter) -> None:
    """A vit stage's layers and removal counts, checked against the tower before anything is attached."""
    name = method.name
    if not hasattr(method, "merge_vit"):
        raise PruneConfigError(f"{name}: a vit stage needs the method to define merge_vit()")
    feature = adapter.feature_layer
    layers = list(stage.vit_layers)
    if not layers:
        raise PruneConfigError(f"{name}: a vit stage needs at least one vision layer")
    bad = [layer for layer in layers if not 0 <= layer < feature]
    if bad:
        raise PruneConfigError(
            f"{name}: vision layer(s) {bad} cannot merge tokens: valid layers are 0..{feature - 1} (the "
            f"tower has {len(adapter.vision_layers)} layers and LLaVA takes its features from layer "
            f"{feature}; later layers never reach the LLM)"
        )
    if layers != sorted(set(layers)):
        raise PruneConfigError(f"{name}: vit layers must be increasing and distinct, got {layers}")
    patches = adapter.grid[0] * adapter.grid[1]
    # vit_remove = 0: the method decides at each layer how many patches to remove (FlowCut).
    if stage.vit_remove < 0 or stage.vit_remove * len(layers) > patches - 1:
        raise PruneConfigError(
            f"{name}: vit_remove={stage.vit_remove} at {len(layers)} layer(s) must be >= 0 and leave at "
            f"least one of the {patches} patches"
        )


class VitMerging:
    """The hooks and per-forward state of one session's vit stage."""

    def __init__(self, method: Method, stage: Stage, adapter, info: ModelInfo):
        self.method, self.stage, self.adapter, self.info = method, stage, adapter, info
        self.qk: dict[int, Captured] = {}
        self.merged: dict[int, torch.Tensor] = {}
        self.positions: torch.Tensor | None = None  # (N, T) tower positions of the surviving patches
        self.valid: torch.Tensor | None = None  # (N, T) after a merge that kept different counts
        self.state: dict = {}
        # (index in vit_layers, (N,) patches per image) after each layer that removed patches (adaptive)
        self.counts: list[tuple[int, torch.Tensor]] = []
        self.entry: tuple[int, int, torch.device] | None = None  # (N, T, device) entering the first layer
        self.mask: torch.Tensor | None = None  # the additive key mask of `valid`, built once per merge
        self.pad_projection = False

    def attach(self, add_capture: AddCapture) -> list:
        """Install the hooks; returns their handles (the captures are registered through `add_capture`)."""
        handles = [
            self.adapter.vision_tower.register_forward_pre_hook(self._reset),
            self.adapter.projector.register_forward_hook(self._pad_hook),
        ]
        for layer in self.stage.vit_layers:
            module = self.adapter.vision_layers[layer]
            add_capture(module.self_attn, self._capture_for(layer), with_value=True)
            handles.append(module.layer_norm2.register_forward_pre_hook(self._merge_hook(layer)))
            handles.append(module.register_forward_hook(self._finish_hook(layer), prepend=True))
        # Later layers mask the padding slots of images that kept fewer patches (adaptive merges only).
        for module in self.adapter.vision_layers[self.stage.vit_layers[0] + 1 :]:
            handles.append(module.register_forward_pre_hook(self._mask_hook, with_kwargs=True))
        return handles

    def tag_output(self, output) -> None:
        """Put the survivors' positions and per-layer counts on the tower's output object."""
        if self.positions is None and self.entry is not None:  # the listed layers ran and removed nothing
            n, t, device = self.entry
            self.positions = torch.arange(t, device=device).expand(n, t)
        output._vtprune_vit_positions = self.positions
        if self.valid is not None and not bool(self.valid.all()):
            raise PruneConfigError(
                f"{self.method.name}: the vit stage left the images of a batch with different patch counts"
            )
        output._vtprune_vit_counts = self._counts_per_layer()
        self.pad_projection = self.positions is not None
        self.positions = None

    def _counts_per_layer(self) -> torch.Tensor | None:
        """(N, len(vit_layers)) patches per image after each listed layer (adaptive merges only): a layer
        that removed nothing keeps the count of the last one that did (all patches before the first)."""
        if self.stage.vit_remove != 0 or self.entry is None:
            return None
        n, t, device = self.entry
        columns = [torch.full((n,), t - 1, dtype=torch.long, device=device)]
        source, merges = [], iter(self.counts)
        upcoming = next(merges, None)
        for index in range(len(self.stage.vit_layers)):
            if upcoming is not None and upcoming[0] == index:
                columns.append(upcoming[1])
                upcoming = next(merges, None)
            source.append(len(columns) - 1)
        return torch.stack([columns[i] for i in source], dim=1)

    def original_index(self, image_out, expanded_from: torch.Tensor | None) -> torch.Tensor:
        """(N, P') original visual-token index (within its image) of each patch the tower output holds."""
        positions = getattr(image_out, "_vtprune_vit_positions", None)
        if positions is None:
            raise PruneConfigError(
                f"{self.method.name}: the image features were computed without vtprune's vit-stage hooks "
                "(before vtprune.prune() was applied); pass pixel_values instead"
            )
        if expanded_from is not None:
            positions = positions[expanded_from]
        # Tower positions count the [CLS] (always kept, first); LLaVA's "default" features drop it.
        return positions[:, 1:] - 1 if self.adapter.select_strategy == "default" else positions

    # --- hooks --------------------------------------------------------------------------------------------
    def _capture_for(self, layer: int):
        def capture(_module, query, key, scaling, value=None):
            self.qk[layer] = Captured(query, key, float(scaling), value)  # read by this layer's merge

        return capture

    def _reset(self, module, args):
        self.qk.clear()
        self.merged.clear()
        self.positions = None
        self.valid = None
        self.state = {}
        self.counts = []
        self.entry = None
        self.mask = None
        self.pad_projection = False

    def _mask_hook(self, module, args, kwargs):
        """Hand a CLIP layer an additive key mask that hides the padding slots (rows of equal width whose
        images kept different numbers of patches), so each image attends exactly as if it were alone. The
        mask is built once after the merge that made the rows ragged and reused until the next merge."""
        valid = self.valid
        if valid is None:
            return None
        mask = self.mask
        if mask is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if compat.attention_implementation(self.adapter.config.vision_config).startswith("flash"):
                raise PruneConfigError(
                    f"{self.method.name}: per-image patch counts inside the vision tower need an sdpa or "
                    "eager vision tower"
                )
            mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
            self.mask = mask
        if len(args) > 1:
            given = args[1]
            return (args[0], mask if given is None else given + mask, *args[2:]), kwargs
        kwargs = dict(kwargs)
        given = kwargs.get("attention_mask")
        kwargs["attention_mask"] = mask if given is None else given + mask
        return args, kwargs

    def _pad_hook(self, module, args, output):
        """Zero-pad the projection of merged tower features back to the prompt's image-token count.

        generate() groups pre-encoded image features per sample by counting image placeholders (beams,
        num_return_sequences), so each image's feature list must keep its placeholder length; the prefill
        cuts the padding off again (`original_index` gives the real width)."""
        if not self.pad_projection:
            return None
        self.pad_projection = False  # only the projection that directly follows the tower
        missing = self.info.visual_tokens - output.shape[1]
        return F.pad(output, (0, 0, 0, missing)) if missing > 0 else None

    def _merge_hook(self, layer: int):
        index = self.stage.vit_layers.index(layer)

        def hook(module, args):
            hidden = args[0]  # (N, T, Dv): the residual stream after layer `layer`'s attention sub-block
            captured = self.qk.pop(layer)
            n, t, _ = hidden.shape
            if self.entry is None:
                self.entry = (n, t, hidden.device)
            signals = ViTLayerSignals(layer, captured, self.valid, self.state)
            out = self.method.merge_vit(self.stage, layer, hidden, signals)
            if out is None:  # nothing removed here: the layer runs untouched
                return None
            # (merged, kept positions) or, when images keep different counts, (merged, kept, valid)
            merged, kept = out[0], out[1]
            valid = out[2] if len(out) > 2 else None
            # The first merge's positions are its kept indices (a gather from the identity).
            self.positions = kept if self.positions is None else torch.gather(self.positions, 1, kept)
            if valid is not self.valid:
                self.mask = None
            self.valid = valid
            if self.stage.vit_remove == 0:  # adaptive: record the patches each image keeps ([CLS] first)
                width = kept.shape[1] - 1
                count = valid[:, 1:].sum(dim=1) if valid is not None else kept.new_full((n,), width)
                self.counts.append((index, count))
            self.merged[layer] = merged.to(hidden.dtype)
            return (hidden[:, :1],)  # the stub: the layer's own ln2/MLP output is replaced below

        return hook

    def _finish_hook(self, layer: int):
        def hook(module, args, output):
            merged = self.merged.pop(layer, None)
            if merged is None:  # the layer merged nothing and ran whole
                return None
            ln = module.layer_norm2
            normed = F.layer_norm(merged, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            out = merged + module.mlp(normed)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook
