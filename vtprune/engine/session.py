"""`PruneSession`: the hooks that make one model prune with one method, and the prefill that drives them.

The session plans the method's stages for the model (per image or per crop when images differ in token
count), captures the attention its method reads, runs the vision stage and assembles the shorter LLM input
at prefill, drops tokens at each LLM stage's layer, and hands decode steps their masks and positions. The
LLM stages are recorded when the prefill ends, in one device-to-host read: a read between layers would leave
the GPU idle while the host launches the next kernels. The tensor work lives in the modules next to this
one; this file decides when each runs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time

import torch

from vtprune import compat
from vtprune.engine.assemble import PromptLayout, assemble_llm_input
from vtprune.engine.decode import begin_step, layer_inputs, static_cache
from vtprune.engine.drop import drop_tokens
from vtprune.engine.images import ImageTokens, equal_shares, expanded_images
from vtprune.engine.positions import (
    keeps_positions,
    kept_prompt_positions,
    layer_position_ids,
    next_position,
    visual_source_columns,
)
from vtprune.engine.selections import (
    concat_selections,
    in_row_numbering,
    selected_tokens,
    selection_row,
    stack_selections,
)
from vtprune.engine.state import Episode, Layout
from vtprune.engine.vit import VitMerging, check_vit_stage
from vtprune.errors import PruneConfigError
from vtprune.methods.base import Method, Selection, Stage
from vtprune.models import adapter_for
from vtprune.record import PruneRecord, StageRecord
from vtprune.signals import attention as attention_capture
from vtprune.signals.context import Captured, LLMSignals, VisionSignals


def _index_or_none(tensor: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or index is None:
        return tensor
    return tensor[index]


class PruneSession:
    """Hooks that make one model prune with one method. Created by `vtprune.prune`, removed by `unprune`."""

    def __init__(self, model: torch.nn.Module, method: Method, timing: bool = False):
        self.model = model
        self.method = method
        self.adapter = adapter_for(model)
        self.info = self.adapter.info()
        method.validate_for(self.info)
        self.stages = method.stages(self.info)
        self._check_stages()
        self.vit_stage = next((s for s in self.stages if s.kind == "vit"), None)
        self.vision_stage = next((s for s in self.stages if s.kind == "vision"), None)
        # Stages before the LLM change the image blocks' length: positions and masks are rebuilt.
        self.shrinks_input = self.vision_stage is not None or self.vit_stage is not None
        self.llm_stages = [s for s in self.stages if s.kind == "llm"]
        self.timing = timing
        self.episode: Episode | None = None
        self.record: PruneRecord | None = None
        self._handles: list = []
        self._captured_modules: list[torch.nn.Module] = []
        self._pending_vision: Captured | None = None
        self._pending_vision_layers: dict[int, Captured] = {}
        self.vit = VitMerging(method, self.vit_stage, self.adapter, self.info) if self.vit_stage else None
        self._signature = inspect.signature(model.forward)
        self._plans: dict[tuple[int, int | None], tuple[Method, list[Stage]]] = {}
        self._pending_records: list[tuple] = []

    def _planned(self, tokens: int, keep: int | None = None) -> tuple[Method, list[Stage]]:
        """The method and its stages for a row (an image, or a sample's images) of `tokens` visual tokens per
        image: models whose images differ in token count plan every row with its own count (a fraction keeps
        that fraction of the row's tokens; a count above them keeps them all). `keep` overrides the budget (a
        crop's share)."""
        if (tokens, keep) not in self._plans:
            method = self.method
            if keep is not None:
                method = dataclasses.replace(method, keep=keep)
            elif isinstance(method.keep, int) and not isinstance(method.keep, bool) and method.keep > tokens:
                method = dataclasses.replace(method, keep=tokens)
            stages = method.stages(dataclasses.replace(self.info, visual_tokens=tokens))
            shape = [(s.kind, s.score_layer, s.prune_layer) for s in stages]
            if shape != [(s.kind, s.score_layer, s.prune_layer) for s in self.stages]:
                raise PruneConfigError(
                    f"{self.method.name}: its layers depend on the image's token count ({tokens}); images with "
                    f"different token counts ({self.info.family}) need the same layers for every image"
                )
            self._plans[tokens, keep] = (method, stages)
        return self._plans[tokens, keep]

    def _select_images(self, index: int, signals: VisionSignals, images: ImageTokens) -> Selection:
        """The vision-stage selection of a model whose images differ in token count: each image with the budget
        its own count gives. With `crop_budget="crop"` (the official LLaVA-NeXT rule of VisPruner, VisionZip and
        CDPruner) every tower input of an image gets an equal share of its budget and is selected with its own
        [CLS]; `image_newline` tokens are not kept. Parts of equal size and share are selected in one call."""
        per_crop_rule = getattr(self.method, "crop_budget", "image") == "crop"
        per_crop = images.crop_hidden.shape[1] - 1 if images.crop_hidden is not None else 0
        whole: dict[int, Selection] = {}
        groups: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
        shares_of: dict[int, list[int]] = {}
        for image, length in enumerate(images.lengths.tolist()):
            method, stages = self._planned(length)
            keep = stages[index].keep
            if not per_crop_rule or keep >= length:
                whole[image] = method.select(index, stages[index], signals.subset(image, 1, length))
                continue
            source = images.source[image, :length]
            crop_of = torch.where(source >= 0, source // per_crop, -1)
            crops = torch.unique(crop_of[crop_of >= 0]).tolist()
            members = [torch.nonzero(crop_of == c).flatten() for c in crops]
            shares = equal_shares(keep, [len(m) for m in members])
            shares_of[image] = [share for share in shares if share]
            for crop, tokens, share in zip(crops, members, shares, strict=True):
                if share:
                    groups.setdefault((len(tokens), share), []).append((image, crop, tokens))
        parts: dict[int, list[Selection]] = {image: [] for image in shares_of}
        for (size, share), group in groups.items():
            method, stages = self._planned(size, keep=share)
            selection = method.select(index, stages[index], signals.crop_rows(group, images.crop_hidden))
            for row, (image, _, tokens) in enumerate(group):
                parts[image].append(in_row_numbering(selection_row(selection, row), tokens, int(images.lengths[image])))
        rows = []
        for image in range(images.count):
            if image in whole:
                rows.append(whole[image])
                continue
            selection = concat_selections(parts[image], signals.projected[image : image + 1])
            selection.info["crop_shares"] = shares_of[image]
            rows.append(selection)
        return stack_selections(rows)

    def _check_stages(self) -> None:
        kinds = [s.kind for s in self.stages]
        if "vit" in kinds[1:] or kinds.count("vit") > 1:
            raise PruneConfigError(f"{self.method.name}: at most one vit stage, and it must come first")
        rest = kinds[1:] if kinds[:1] == ["vit"] else kinds
        if "vision" in rest[1:] or rest.count("vision") > 1:
            raise PruneConfigError(
                f"{self.method.name}: at most one vision stage, and it must come first (after a vit stage)"
            )
        if kinds[:1] == ["vit"]:
            if self.info.variable_tokens:
                raise PruneConfigError(
                    f"{self.method.name}: merging inside the vision tower (a vit stage) is not supported on "
                    f"{self.info.family}, which packs a fixed number of patches per crop"
                )
            check_vit_stage(self.method, self.stages[0], self.adapter)
        layers = [s.prune_layer for s in self.stages if s.kind == "llm"]
        if layers != sorted(set(layers)):
            raise PruneConfigError(
                f"{self.method.name}: LLM stages must prune at increasing layers, got {layers}"
            )
        for stage in self.stages:
            # Attention methods read rows of the score layer's attention; a method that reads only its key
            # states (DART) names no rows.
            if (
                stage.kind == "llm"
                and stage.score_layer < stage.prune_layer
                and stage.queries is None
                and self.method.attention_based
            ):
                raise PruneConfigError(
                    f"{self.method.name}: an LLM stage that scores a layer must name its query rows"
                )

    # --- attach / detach --------------------------------------------------------------------------------
    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True))
        self._handles.extend(self.adapter.session_hooks())
        if self.llm_stages:
            first = self.llm_stages[0].prune_layer
            for idx in range(first, self.info.num_layers):
                hook = self._make_layer_hook(idx)
                self._handles.append(
                    self.adapter.layers[idx].register_forward_pre_hook(hook, with_kwargs=True)
                )
        # The [CLS] row is read by vision-stage methods and by sink debiasing; capturing costs two references.
        self._handles.append(self.adapter.vision_tower.register_forward_hook(self._tag_vision_output))
        if self.vit is not None:
            self._handles.extend(self.vit.attach(self._add_capture))
        vision_attention = self.adapter.vision_attention_module()
        if vision_attention is not None:  # None: the adapter recomputes what it reads (Qwen-VL)
            self._add_capture(vision_attention, self._capture_cls)
        # Other CLIP layers whose attention the method reads (HiPrune's object layer): generate() encodes the
        # images without keeping every layer's hidden states, so their q/k are captured while the tower runs.
        vit_layers = self.vit_stage.vit_layers if self.vit_stage is not None else ()
        for layer in self.method.vision_attention_layers(self.info):
            if layer != self.adapter.feature_layer and layer not in vit_layers:
                self._add_capture(self.adapter.vision_layers[layer].self_attn, self._capture_vision_layer(layer))
        for stage in self.llm_stages:
            if stage.score_layer < stage.prune_layer:
                self._add_capture(self.adapter.layers[stage.score_layer].self_attn, self._capture_llm_layer(stage.score_layer))

    def detach(self, active_sessions: int) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._captured_modules:
            attention_capture.remove_capture(module)
        self._captured_modules.clear()
        attention_capture.release_if_unused(active_sessions)
        self.episode = None

    def _add_capture(self, module: torch.nn.Module, callback, with_value: bool = False) -> None:
        """Read `module`'s q/k (and v) while this session lives (signals/attention.py)."""
        attention_capture.add_capture(module, callback, with_value=with_value)
        self._captured_modules.append(module)

    def _capture_cls(self, _module, query, key, scaling):
        # The tower may run before the prefill call (generate() pre-encodes images): held until its output.
        self._pending_vision = Captured(query, key, float(scaling))

    def _capture_vision_layer(self, layer: int):
        def capture(_module, query, key, scaling):  # another CLIP layer, tied to the tower output
            self._pending_vision_layers[layer] = Captured(query, key, float(scaling))

        return capture

    def _capture_llm_layer(self, layer: int):
        def capture(_module, query, key, scaling):
            episode = self.episode
            if episode is not None and not episode.prefill_done and query.shape[2] > 1:
                # The prefill starts from an empty cache, so its keys are the first q; a static cache returns
                # its whole preallocated buffer.
                episode.captures[layer] = Captured(query, key[:, :, : query.shape[2]], float(scaling))

        return capture

    def _tag_vision_output(self, module, args, output):
        # Ties the captured [CLS] q/k (and the vit stage's surviving positions) to the very output object it
        # belongs to.
        output._vtprune_capture = self._pending_vision
        output._vtprune_layer_captures = self._pending_vision_layers
        output._vtprune_pixels = args[0] if args else None
        self._pending_vision, self._pending_vision_layers = None, {}
        if self.vit is not None:
            self.vit.tag_output(output)
        return None

    def _vision_capture(self, image_out, image_index: torch.Tensor | None) -> Captured | None:
        """The [CLS] q/k captured when the tower produced `image_out` (None when vtprune did not see it run;
        VisionSignals then recomputes q/k if asked). `image_index` maps expanded images to computed ones."""
        captured = getattr(image_out, "_vtprune_capture", None)
        if captured is None:
            return None
        if image_index is not None:
            captured = Captured(captured.query[image_index], captured.key[image_index], captured.scaling)
        return captured

    def _vision_layer_captures(self, image_out, image_index: torch.Tensor | None) -> dict[int, Captured]:
        """q/k of the other CLIP layers the method reads, captured when the tower produced `image_out`."""
        captured = getattr(image_out, "_vtprune_layer_captures", None) or {}
        if image_index is None:
            return dict(captured)
        return {
            layer: Captured(c.query[image_index], c.key[image_index], c.scaling)
            for layer, c in captured.items()
        }

    # --- timing -----------------------------------------------------------------------------------------
    def _clock(self) -> float:
        if self.timing and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    # --- top-level hooks --------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> dict:
        if not args:
            return dict(kwargs)
        bound = self._signature.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}))
        return out

    def _pre_forward(self, module, args, kwargs):
        call = self._bind(args, kwargs)
        if self.adapter.has_visual_input(call):
            return (), self._prefill(call)
        episode = self.episode
        cache = compat.cache_from_call(call)
        if episode is not None and episode.prefill_done and cache is not None and cache is episode.cache:
            return (), begin_step(episode, call, self.adapter.attn_implementation)
        self.episode = None  # a text-only call: nothing to prune
        return None

    def _post_forward(self, module, args, kwargs, output):
        episode = self.episode
        if episode is None:
            return None
        if not episode.prefill_done:
            episode.prefill_done = True
            if self.record is not None and self._pending_records:
                self.record.stages.extend(self._stage_records(self._pending_records))
            self._pending_records = []
            episode.cache = compat.cache_from_output(output)
            episode.captures.clear()  # release q/k of the scored layers
            if self.record is not None and self.timing:
                self.record.timings_ms["total_prefill"] = (self._clock() - self._prefill_start) * 1e3
        else:
            if not static_cache(episode):  # a static cache counts on the device (engine/decode.py)
                episode.decode_len += episode.step.get("q_len", 0)
            episode.step = {}
        return None

    # --- prefill ----------------------------------------------------------------------------------------
    def _token_coordinates(self, image_sizes, batch: int) -> list[list[list[int]]] | None:
        """Per sample, per visual token in original numbering: (image, frame, row, column), where the adapter
        defines them (`token_coordinates`, Qwen-VL); None otherwise."""
        if image_sizes is None or len(image_sizes) % batch:
            return None
        per_image = [self.adapter.token_coordinates(size) for size in image_sizes]
        if any(c is None for c in per_image):
            return None
        n_img = len(per_image) // batch
        table = []
        for b in range(batch):
            mine = per_image[b * n_img : (b + 1) * n_img]
            table.append(torch.cat([torch.cat([torch.full((len(c), 1), i), c], dim=1) for i, c in enumerate(mine)]).tolist())
        return table

    def _prefill(self, call: dict) -> dict:
        self._prefill_start = self._clock()
        self._pending_records = []  # the stages' records, read when the prefill ends (`_defer_record`)
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise PruneConfigError(
                "vtprune needs `input_ids` (not only inputs_embeds) to locate the image tokens"
            )
        cache = compat.cache_from_call(call)
        if cache is not None and cache.get_seq_length() > 0:
            raise PruneConfigError(
                "vtprune prunes at prefill; continuing a non-empty cache with a new image is not supported"
            )
        if self.llm_stages and not compat.cache_holds_any_length(cache):
            raise PruneConfigError(
                f"{self.method.name} prunes inside the LLM, so each layer's KV cache holds a different number of "
                f"tokens: it supports the dynamic and static caches (cache_implementation='dynamic' or 'static'), "
                f"not {type(cache).__name__}"
            )
        batch, length = input_ids.shape
        mask2d = call.get("attention_mask")
        if compat.is_prebuilt_mask(mask2d) and compat.static_key_length(cache, 0) is not None:
            # generate() prebuilt the 4-D mask of the full prompt (None: no padding); the engine builds its own.
            prebuilt = compat.prebuilt_mask(mask2d)
            mask2d = None if prebuilt is None else compat.padding_mask_of_prebuilt(prebuilt, length).long()
        if mask2d is not None and (not isinstance(mask2d, torch.Tensor) or mask2d.ndim != 2):
            raise PruneConfigError("vtprune needs a 2-D attention_mask (batch, sequence)")
        text_valid_in = mask2d.bool() if mask2d is not None else torch.ones_like(input_ids, dtype=torch.bool)
        # The prompt's layout (image blocks, lengths, padding) is read from host copies of the ids and the mask,
        # taken before the vision tower is queued: from here on the prefill reads nothing from the device until
        # it ends, so the host launches the selection and the LLM while the GPU still runs the tower.
        ids_host = input_ids.cpu()
        text_valid_host = text_valid_in.cpu() if mask2d is not None else None
        # Vision tower (once; generate() may have run it already): for models whose images differ in token
        # count, the counts (and so the image blocks of the prompt) are known only from the images.
        t0 = self._clock()
        visual_input = self.adapter.take_visual_input(call)
        image_out, image_sizes = visual_input.output, visual_input.sizes
        vision_ms = (self._clock() - t0) * 1e3
        hidden_v, projected = self.adapter.unpack_image_output(image_out)
        images = ImageTokens.build(self.adapter, hidden_v, projected, image_sizes, batch)
        image_layout = self.adapter.locate_images(ids_host, images.count, images.lengths)
        n_img = image_layout.images_per_sample
        sample_tokens = image_layout.lengths.sum(dim=1).tolist()
        record = PruneRecord(
            method=self.method.name,
            params={k: v for k, v in self.method.params().items()},
            visual_tokens=max(sample_tokens),
            num_layers=self.info.num_layers,
            sample_visual_tokens=sample_tokens if len(set(sample_tokens)) > 1 else None,
        )
        if visual_input.encoded_here:  # the tower ran here, not in generate()
            record.timings_ms["vision"] = vision_ms
        record.token_coordinates = self._token_coordinates(image_sizes, batch)
        self.record = record
        self.episode = episode = Episode(
            layouts=[], input_embeds=None, cache=cache, images_per_sample=n_img, sample_tokens=sample_tokens
        )
        # M-RoPE prompts always get explicit positions (the kept tokens' own), and so do their decode steps.
        episode.input_rebuilt = self.shrinks_input or not images.uniform or self.adapter.mrope

        hidden_v, projected = images.hidden, images.projected
        expanded_from = None
        if projected.shape[0] != hidden_v.shape[0]:
            # generate() repeats each sample's image group for beams / num_return_sequences in the projected
            # features only; map every expanded image to its computed one.
            expanded_from = expanded_images(projected.shape[0], hidden_v.shape[0], batch).to(
                projected.device, non_blocking=True
            )
            hidden_v = hidden_v[expanded_from]
        vit_orig = self.vit.original_index(image_out, expanded_from) if self.vit is not None else None
        if vit_orig is not None:
            projected = projected[:, : vit_orig.shape[1]]  # drop the padding the vit stage added
        t1 = self._clock()
        per_image = projected.shape[1]
        n_total = hidden_v.shape[0]
        image_index = torch.arange(n_total, device=projected.device)
        is_image = self.adapter.visual_token_mask(input_ids)
        is_image_host = self.adapter.visual_token_mask(ids_host)
        episode.text_width = _text_width(is_image_host, text_valid_host)
        vision_signals = VisionSignals(
            adapter=self.adapter,
            hidden=hidden_v,
            projected=projected,
            image_sample=image_index // n_img,
            input_ids=input_ids,
            text_valid=text_valid_in & ~is_image,
            captured=self._vision_capture(image_out, expanded_from),
            pixel_values=_index_or_none(getattr(image_out, "_vtprune_pixels", None), expanded_from),
            image_output=image_out,
            source=images.source,
            image_crop=images.image_crop,
            lengths=None if images.uniform else images.lengths.to(projected.device, non_blocking=True),
            image_index=expanded_from,
            layer_captures=self._vision_layer_captures(image_out, expanded_from),
        )
        episode.vision = vision_signals
        # Original numbering: a sample's visual tokens, image after image.
        lengths = image_layout.lengths.to(projected.device, non_blocking=True)
        image_offset = (torch.cumsum(lengths, dim=1) - lengths).reshape(-1, 1)
        if vit_orig is not None:
            if self.adapter.select_strategy == "default" and vision_signals.captured is not None:
                # Per-original lookups (debiasing) expect the full patch width: merged-away patches get 0.
                full = torch.zeros(n_total, self.info.visual_tokens, device=projected.device)
                vision_signals.__dict__["cls_attention"] = full.scatter(
                    1, vit_orig, vision_signals.cls_attention.float()
                )
            extra = {"layers": list(self.vit_stage.vit_layers), "removed_per_layer": self.vit_stage.vit_remove}
            counts = getattr(image_out, "_vtprune_vit_counts", None)
            if counts is not None:  # adaptive merges: patches per image after each listed layer
                extra["patches_after_layer"] = _index_or_none(counts, expanded_from)
            self._defer_record(
                self.vit_stage,
                0,
                (vit_orig + image_offset).view(batch, -1),
                None,  # the tower output holds no padding slots (tag_output checks): all kept
                None,
                extra,
            )
        if self.vision_stage is not None:
            index = self.stages.index(self.vision_stage)
            if not self.info.variable_tokens:
                selection = self.method.select(index, self.vision_stage, vision_signals)
            elif images.uniform and getattr(self.method, "crop_budget", "image") == "image":
                method, stages = self._planned(int(images.lengths[0]))  # the images' token count's budget
                selection = method.select(index, stages[index], vision_signals)
            else:
                selection = self._select_images(index, vision_signals, images)
            tokens, valid, orig = selected_tokens(selection, projected)
            kept_width = selection.indices.shape[1]  # slots after it hold created tokens
            if vit_orig is not None:  # selection indices count the patches the tower kept
                orig = torch.where(orig >= 0, torch.gather(vit_orig, 1, orig.clamp(min=0)), orig)
            orig = torch.where(orig >= 0, orig + image_offset, orig)
            record.timings_ms["select_vision"] = (self._clock() - t1) * 1e3
            self._defer_record(self.vision_stage, 0, orig.view(batch, -1), valid.view(batch, -1), selection)
            # whether every slot holds a token, when the method knows it on the host (None: read below)
            slots_full = selection.all_valid
            if slots_full is None and selection.valid is None and selection.extra_valid is None:
                slots_full = True
        else:
            tokens = projected
            valid_host = images.token_valid[:, :per_image]
            slots_full = bool(valid_host.all())
            valid = valid_host.to(projected.device, non_blocking=True)
            if vit_orig is not None:
                orig = vit_orig + image_offset
            else:
                orig = torch.arange(per_image, device=projected.device).expand(n_total, -1) + image_offset
            orig = orig.masked_fill(~valid, -1)
            kept_width = tokens.shape[1]

        width = tokens.shape[1]
        prompt = PromptLayout.build(is_image_host, image_layout.starts, image_layout.lengths, width)
        new_len = prompt.new_len
        prompt = prompt.to(projected.device)
        slot_pos = prompt.slot_pos
        embeds = self.adapter.embed(input_ids)
        inputs_embeds, key_valid = assemble_llm_input(embeds, text_valid_in, prompt, tokens, valid)
        # A static cache sized for the prompt: the pruned prompt needs fewer slots (attention reads every slot
        # of a static layer at each decode step), or more when images of different token counts in one batch
        # lengthen it with padded image slots.
        fitted = new_len == length or compat.fit_static_cache(cache, 0, new_len - length)
        if not fitted and new_len > length:
            raise PruneConfigError(
                f"the images of this batch differ in token count, so the pruned prompt is {new_len - length} "
                "tokens longer than the one the static cache was sized for; pass a fresh cache"
            )

        # The prompt's holes, outside the visual slots (prompt padding, which every later layer group keeps:
        # engine/drop.py then needs no read when a method knows its own slots) and in them, known on the host
        # unless the selection left slots empty at its own discretion.
        text_valid = not prompt.padded and (
            text_valid_host is None or bool(text_valid_host[~is_image_host].all())
        )
        all_valid = text_valid and (slots_full if slots_full is not None else bool(valid.all()))
        position_ids = call.get("position_ids")
        decode_start = None
        if self.adapter.mrope:
            # Each token keeps the unpruned model's (t, h, w) position of that very token.
            full_positions = self.adapter.prompt_positions(input_ids, mask2d, visual_input)
            source_column = torch.full((batch, new_len), -1, dtype=torch.long, device=key_valid.device)
            source_column[prompt.text_rows, prompt.text_new_cols] = prompt.text_cols
            source_column.scatter_(1, slot_pos, visual_source_columns(is_image_host, orig, valid, kept_width))
            position_ids = kept_prompt_positions(full_positions, source_column, key_valid)
            # Decoding continues where the unpruned prompt would (its rope_deltas), whatever was kept.
            decode_start = next_position(full_positions, text_valid_in | is_image)
        elif episode.input_rebuilt or position_ids is None and not all_valid:
            position_ids = (torch.cumsum(key_valid, dim=1) - 1).clamp(min=0).masked_fill(~key_valid, 0)
        elif position_ids is None:
            position_ids = torch.arange(new_len, device=inputs_embeds.device)[None].expand(batch, -1)
        if position_ids.ndim == 2 and position_ids.shape[0] != batch:
            position_ids = position_ids.expand(batch, -1)
        layout0 = Layout(
            all_valid=all_valid,
            text_valid=text_valid,
            first_layer=0,
            key_valid=key_valid,
            position_ids=position_ids,
            visual_index=slot_pos,
            visual_valid=valid.reshape(batch, n_img * width),
            original_index=orig.reshape(batch, n_img * width),
            decode_start=decode_start,
        )
        episode.layouts.append(layout0)
        episode.input_embeds = inputs_embeds

        call["input_ids"] = None
        call["inputs_embeds"] = inputs_embeds
        call["position_ids"] = position_ids
        call["attention_mask"] = None if mask2d is None and all_valid else key_valid.long()
        if not self.stages:
            stage = Stage(kind="vision", keep=width, name="none")
            self._defer_record(stage, 0, layout0.original_index, layout0.visual_valid, None)
        return call

    def _defer_record(
        self, stage: Stage, index: int, orig: torch.Tensor, valid: torch.Tensor | None, selection, extra=None
    ) -> None:
        """Record a stage when the prefill ends (`_post_forward`), every stage in one device-to-host transfer:
        a read here would stall the queue. valid None: every slot of `orig` is kept; `extra`: more facts for
        the record (an integer tensor among them is read in the same transfer)."""
        if valid is None:
            valid = torch.ones_like(orig, dtype=torch.bool)
        self._pending_records.append((stage, index, orig, valid, selection, extra or {}))

    def _stage_records(self, parts: list[tuple]) -> list[StageRecord]:
        """The records of stages given as (stage, index, original numbering, validity, selection, extra), read
        from the device in one transfer: their kept tokens and the tensors their methods left in `info`."""
        tensors: list[torch.Tensor] = []
        for _, _, orig, valid, selection, extra in parts:
            tensors += [orig, valid]
            info = {**(selection.info if selection is not None else {}), **extra}
            tensors += [v for v in info.values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.is_floating_point() or t.is_complex():
                raise TypeError("a Selection.info tensor must hold integers or bools (it is read as a list)")
        flat = []
        if tensors:
            flat = torch.cat([t.reshape(-1).long().to(tensors[0].device) for t in tensors]).tolist()
        lists = iter(_split_lists(flat, tensors))
        records = []
        for stage, index, _, _, selection, more in parts:
            kept = [
                [o for o, v in zip(row, vrow, strict=False) if v]
                for row, vrow in zip(next(lists), next(lists), strict=False)
            ]
            extra = {**(selection.info if selection is not None else {}), **more}
            for key, value in extra.items():
                if isinstance(value, torch.Tensor):
                    extra[key] = next(lists)
            records.append(
                StageRecord(
                    name=stage.name or f"{stage.kind}{index}",
                    kind=stage.kind,
                    score_layer=stage.score_layer,
                    prune_layer=stage.prune_layer,
                    positions="original" if keeps_positions(stage, self.adapter.mrope) else "reindex",
                    kept=kept,
                    counts=[len(k) for k in kept],
                    extra=extra,
                )
            )
        return records

    # --- decoder-layer hook -------------------------------------------------------------------------------
    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            episode = self.episode
            if episode is None:
                return None
            if not episode.prefill_done:
                return self._layer_prefill(layer_idx, args, kwargs)
            return self._layer_decode(layer_idx, args, kwargs)

        return hook

    def _layer_prefill(self, layer_idx: int, args, kwargs):
        episode = self.episode
        stage_index = next(
            (i for i, s in enumerate(self.stages) if s.kind == "llm" and s.prune_layer == layer_idx), None
        )
        hidden = args[0] if args else kwargs["hidden_states"]
        if stage_index is not None:
            hidden = self._drop(stage_index, layer_idx, hidden, kwargs)
        layout = episode.layout_for(layer_idx)
        if layout.first_layer == 0:
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = layout.prefill_mask
        kwargs["position_embeddings"] = layout.prefill_rope
        kwargs["position_ids"] = layer_position_ids(layout.position_ids)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _drop(self, stage_index: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Select at an LLM stage boundary and gather everything the later layers need."""
        t0 = self._clock()
        episode = self.episode
        stage = self.stages[stage_index]
        prev = episode.layout_for(layer_idx - 1)
        layout0 = episode.layouts[0]
        signals = LLMSignals(
            adapter=self.adapter,
            layer=layer_idx,
            hidden=hidden,
            key_valid=prev.key_valid,
            visual_index=prev.visual_index,
            visual_valid=prev.visual_valid,
            original_index=prev.original_index,
            position_ids=prev.position_ids,
            images_per_sample=episode.images_per_sample,
            input_embeds=episode.input_embeds,
            input_visual_index=layout0.visual_index,
            input_valid=layout0.key_valid,
            captured=episode.captures.pop(stage.score_layer, None)
            if stage.score_layer < stage.prune_layer
            else None,
            vision=episode.vision,
        )
        if episode.text_width is not None:  # from the host copies: "text" query rows need no read of their own
            signals.set_text_width(episode.text_width)
        sample_tokens = episode.sample_tokens
        if not self.info.variable_tokens:
            selection = self.method.select(stage_index, stage, signals)
        elif len(set(sample_tokens)) == 1:  # the budget the samples' token count gives
            per_image = round(sample_tokens[0] / episode.images_per_sample)
            method, stages = self._planned(per_image)
            signals.row_tokens_per_image = per_image
            selection = method.select(stage_index, stages[stage_index], signals)
        else:  # each sample with the budget its own token count gives
            rows = []
            for b, total in enumerate(sample_tokens):
                per_image = round(total / episode.images_per_sample)
                method, stages = self._planned(per_image)
                row, among = signals.row(b, per_image)
                selected = method.select(stage_index, stages[stage_index], row)
                rows.append(in_row_numbering(selected, among, prev.visual_index.shape[1]))
            selection = stack_selections(rows)
        if selection.extra is not None and keeps_positions(stage, False) and not self.adapter.mrope:
            raise PruneConfigError(f"{self.method.name}: created tokens need re-indexed positions")
        # The layers from here on hold the shortened sequence: their static cache layers need no more slots.
        width = selection.indices.shape[1] + (0 if selection.extra is None else selection.extra.shape[1])
        compat.fit_static_cache(episode.cache, layer_idx, width - prev.visual_index.shape[1])
        new_hidden, layout = drop_tokens(
            hidden,
            prev,
            selection,
            stage,
            layer_idx,
            model_rope=kwargs.get("position_embeddings"),
            rotary=self.adapter.rotary,
            attn_implementation=self.adapter.attn_implementation,
            key_length=compat.static_key_length(episode.cache, layer_idx),
            mrope=self.adapter.mrope,
        )
        episode.layouts.append(layout)
        self._defer_record(stage, stage_index, layout.original_index, layout.visual_valid, selection)
        self.record.timings_ms[f"select_{stage.name or f'llm{stage_index}'}"] = (self._clock() - t0) * 1e3
        return new_hidden

    # --- decode -------------------------------------------------------------------------------------------
    def _layer_decode(self, layer_idx: int, args, kwargs):
        episode = self.episode
        layout = episode.layout_for(layer_idx)
        if layout.first_layer == 0 or not episode.step:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mask, rope, position_ids = layer_inputs(
            episode, layout, layer_idx, hidden, self.adapter.rotary, self.adapter.attn_implementation
        )
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        if rope is not None:
            kwargs["position_embeddings"] = rope
            kwargs["position_ids"] = position_ids
        return args, kwargs


def _split_lists(flat: list, tensors: list[torch.Tensor]) -> list:
    """`flat` (the tensors' values, flattened and concatenated) cut back into one nested list per tensor, of
    its shape, as `tolist` gives it (bool tensors give bools)."""

    def nest(values: list, shape: tuple[int, ...]):
        if len(shape) <= 1:
            return values
        step = math.prod(shape[1:])
        return [nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]

    out, start = [], 0
    for t in tensors:
        values = flat[start : start + t.numel()]
        start += t.numel()
        if t.dtype == torch.bool:
            values = [bool(v) for v in values]
        out.append(nest(values, tuple(t.shape)) if t.ndim else values[0])
    return out


def _text_width(is_image: torch.Tensor, text_valid: torch.Tensor | None) -> int:
    """The most real tokens any sample has after its last image token (host tensors; every sample holds an
    image: `locate_images` checked): the width of the LLM signals' "text" query rows, which only visual
    tokens are ever dropped from."""
    length = is_image.shape[1]
    positions = torch.arange(length)
    last_image = torch.where(is_image, positions, -1).amax(dim=1)
    after = positions > last_image[:, None]
    if text_valid is not None:
        after &= text_valid
    return int(after.sum(dim=1).max())

