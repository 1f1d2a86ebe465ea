"""`vtprune bench`: time every method × budget × batch against the unpruned model and the oracle.

For each configuration the same inputs go through

* the **method** (`vtprune.prune(model, method, keep=T)`);
* its **oracle** (`FixedSelection` replaying the method's kept tokens at the same stages, no scoring:
  bench/oracle.py), so `overhead = method − oracle` is the price of scoring and selecting;

and, once per batch size, through the **unpruned** model with no hook at all, the vision tower alone, and a
**short prompt** per budget (the unmodified model given `inputs_embeds` holding T image tokens gathered from
its own projected features: the cost of T tokens with no engine in the way).

Measured (CUDA events on a GPU, host clock on a CPU; `warmup` untimed calls first; medians of `repeats`):

* `prefill_ms`: one forward `model(**inputs, use_cache=True, logits_to_keep=1)`, i.e. vision tower +
  selection + LLM + LM head on the last position, exactly the prefill `generate` runs: the time to first token;
* `vision_ms`, `select_ms` (and `phases_ms`): the engine's own per-phase clocks (`prune(..., timing=True)`,
  which synchronises the device around each phase; taken in separate repeats so the headline prefill is
  free of those syncs);
* `e2e_ms`: `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` (greedy, exactly N tokens,
  EOS cannot stop it); `ttft_generate_ms`: the same call for one token (prefill + first token);
  `decode_ms_per_token` = (e2e − TTFT) / (N − 1), so it includes generate's per-step Python (no hook marks the
  steps: it would be traced into a compiled decode step); missing ("–") when not resolved (median ≤ 0: the
  steps took less than the calls' noise — use more new tokens);
  `--cache static` runs generate with a preallocated cache, which transformers compiles on a GPU (torch.compile,
  CUDA graphs: vtprune/compiled.py; the first calls compile and are not timed), for the unpruned model, the
  methods and the oracles alike;
* `--compile-prefill` runs every subject inside `vtprune.compiled.compiled_prefill` (static shapes): the vision
  tower and the decoder stack compiled wherever the subject allows (an unpruned model, oracle or short prompt
  always); each subject starts from a clean compiler state and its first calls compile, untimed;
* `throughput_samples_s` = batch / e2e, `tokens_per_s` = batch · N / e2e;
* `peak_mem_*_bytes`: `torch.cuda.max_memory_allocated` over the prefill repeats and over the generate
  repeats (weights included; `weights_bytes` is given once);
* `kv_cache_bytes`: summed over the cache object `generate` returns (prompt + N − 1 tokens per layer), next to
  `kv_cache_bytes_theory` from bench/flops.py with the record's per-layer token counts.

FLOPs (bench/flops.py, per sample): true FLOPs (2 per MAC, SwiGLU, causal attention, LM head on one
position, vision tower and projector) and the FastV-convention count, with the record's per-layer tokens.

LLaVA-NeXT: every sample holds one image of `image_size` (bench/workload.py); budgets are counts per image of
its tokens (`all` = every one), the vision tower and projector run on all of its crops in every subject.

Qwen2-VL / Qwen2.5-VL: the same, with one dynamic-resolution image per sample (bench/workload.py); the vision
tower time and the short prompt take the model's own `get_image_features(pixel_values, image_grid_thw)` (its
merger included), and FLOPs count the tower's windowed and full-attention blocks on that image's patch grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vtprune
from vtprune import compat
from vtprune.bench import flops as F
from vtprune.bench.oracle import FixedSelection
from vtprune.bench.timing import Clock, summarize
from vtprune.bench.workload import BenchModel, Inputs, build_model, image_of, synthetic_inputs
from vtprune.compiled import STATIC_CACHE, compiled_parts, compiled_prefill, generation_kwargs
from vtprune.methods.base import METHODS, Method, PruneConfigError, make_method, method_class

__all__ = ["BenchConfig", "Bench", "run_bench", "SCHEMA"]

SCHEMA = "vtprune.bench/1"
KEEP_ALL = "all"  # a --keep entry: every visual token of the image (2,928 for a 672 x 672 LLaVA-1.6 image)
CACHES = ("dynamic", STATIC_CACHE)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# generate() with a static cache compiles its decode step on a GPU: the first calls compile (and may recompile once)
STATIC_WARMUP_CALLS = 3
# a compiled prefill: the first call compiles, the second may recompile once (one-time setup, a guard)
COMPILED_PREFILL_WARMUP_CALLS = 2
PHASE_REPEATS = 3  # the synchronised per-phase repeats only split the prefill; fewer are enough
PROFILE_MAX_DECODE_METHODS = 1  # each compiles its decode step again first (~40 s on an H200)


@dataclass
class BenchConfig:
    model: str | None = None
    arch: str | None = None
    random_weights: bool = False
    methods: list[str] = field(default_factory=lambda: ["none", "fastv", "vispruner"])
    keeps: list[int | str] = field(default_factory=lambda: [576, 192, 128, 64])  # KEEP_ALL: the image's tokens
    batches: list[int] = field(default_factory=lambda: [1, 16])
    new_tokens: int = 8
    attn: str = "sdpa"
    cache: str = "dynamic"  # generate()'s KV cache: "static" preallocates it (on a GPU generate then compiles decode)
    compile_prefill: bool = False  # every subject's prefill inside compiled_prefill (vtprune/compiled.py)
    compile_mode: str = "reduce-overhead"  # its torch.compile mode (CUDA graphs)
    repeats: int = 5
    warmup: int = 1
    dtype: str = "auto"
    device: str = "auto"
    output: Path | None = None
    text_tokens: int = 60
    image_size: tuple[int, int] | None = None  # (height, width), AnyRes / Qwen-VL; None: the model's default
    params: dict[str, dict] = field(default_factory=dict)  # method name -> hyper-parameters
    oracle: bool = True
    oracle_generate: bool = True  # also time the oracle's generate() (e2e overhead); prefill is always timed
    generate_repeats: int | None = None  # timed generate calls (None: `repeats`)
    profile: bool = False
    time_budget_s: float | None = None
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Every user input checked before anything is built, with the valid choices in the message."""
        if not self.methods:
            raise PruneConfigError("--methods names no method; see `vtprune methods`")
        for name in self.methods:
            method_class(name)
        unknown = sorted(set(self.params) - set(self.methods))
        if unknown:
            raise PruneConfigError(f"--param names method(s) not benchmarked: {', '.join(unknown)}")
        for name in self.methods:
            make_method(name, **self.params.get(name, {}))  # parameter names and ranges
        if not self.keeps or not all(k == KEEP_ALL or _positive_int(k) for k in self.keeps):
            raise PruneConfigError(f"--keep must list visual-token counts >= 1 or '{KEEP_ALL}', got {self.keeps}")
        size = self.image_size
        if size is not None and not (
            isinstance(size, (tuple, list)) and len(size) == 2 and all(_positive_int(v) for v in size)
        ):
            raise PruneConfigError(
                f"--image-size must be two positive integers, height x width, got {self.image_size}"
            )
        if not self.batches or any(b < 1 for b in self.batches):
            raise PruneConfigError(f"--batch must list sizes >= 1, got {self.batches}")
        if self.new_tokens < 2:
            raise PruneConfigError(
                f"--new-tokens must be >= 2 (one prefill token and at least one decode step), got {self.new_tokens}"
            )
        if self.generate_repeats is not None and self.generate_repeats < 1:
            raise PruneConfigError(f"--generate-repeats must be >= 1, got {self.generate_repeats}")
        if self.repeats < 1 or self.warmup < 0:
            raise PruneConfigError(
                f"--repeats must be >= 1 and --warmup >= 0, got {self.repeats}, {self.warmup}"
            )
        if self.text_tokens < 2:
            raise PruneConfigError(f"--text-tokens must be >= 2, got {self.text_tokens}")
        if self.cache not in CACHES:
            raise PruneConfigError(f"unknown --cache {self.cache!r}; valid: {', '.join(CACHES)}")
        if self.compile_mode not in COMPILE_MODES:
            raise PruneConfigError(f"unknown --compile-mode {self.compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def resolve_keeps(keeps: list[int | str], visual: int, image: str) -> list[int]:
    """The budgets as counts per image (`all` = the image's `visual` tokens), duplicates dropped, order kept.

    A count above the image's tokens is refused rather than clamped: its row would be labelled with a budget
    the model never ran (the engine itself keeps every token of an image smaller than a count)."""
    counts = [visual if k == KEEP_ALL else k for k in keeps]
    too_big = [k for k in counts if k > visual]
    if too_big:
        raise PruneConfigError(
            f"--keep {too_big} larger than the {visual} visual tokens per image of this model ({image}); "
            f"use '{KEEP_ALL}' for every token"
        )
    return list(dict.fromkeys(counts))


def expand_methods(names: list[str]) -> list[str]:
    """`all` stands for every registered method; duplicates are dropped, order kept."""
    method_class("none")  # loads the built-in methods
    out: list[str] = []
    for name in names:
        for item in sorted(METHODS) if name == "all" else [name]:
            if item not in out:
                out.append(item)
    return out


def method_label(name: str, params: dict) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


def cache_bytes(cache) -> int | None:
    """Bytes held by a transformers cache object (keys and values of every layer)."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    total = 0
    if layers is not None:
        for layer in layers:
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    try:  # legacy tuple-of-tuples caches
        for layer in cache:
            for t in layer:
                total += t.numel() * t.element_size()
    except TypeError:
        return None
    return total


def gpu_busy_us(averages) -> float:
    """Device time of the kernels alone (µs). An operator's "self device time" repeats its kernels' time, so
    only events that ran on the device itself are summed (what the profiler's "Self CUDA time total" shows)."""
    from torch.autograd import DeviceType

    return float(
        sum(
            getattr(evt, "self_device_time_total", 0.0) or 0.0
            for evt in averages
            if getattr(evt, "device_type", None) == DeviceType.CUDA
        )
    )


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


class Bench:
    """Measurements on one built model; every timed call goes through here."""

    def __init__(self, loaded: BenchModel, cfg: BenchConfig):
        self.loaded = loaded
        self.model = loaded.model
        self.cfg = cfg
        self.clock = Clock(loaded.device)
        self.cuda = self.clock.cuda

    # --- primitives -------------------------------------------------------------------------------------
    def new_subject(self) -> None:
        """A compiled prefill: start each subject from a clean compiler state. Its hooks are new guards, and
        graphs piled up from earlier subjects would reach dynamo's recompile limit and fall back to eager."""
        if self.cfg.compile_prefill:
            torch._dynamo.reset()

    def _reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.loaded.device)
            torch.cuda.reset_peak_memory_stats(self.loaded.device)

    def _peak(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize(self.loaded.device)
        return int(torch.cuda.max_memory_allocated(self.loaded.device))

    def time_calls(self, fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
        """Milliseconds of `repeats` calls of `fn` after `warmup` untimed ones (one sync per call; a compiled
        prefill gets the calls that compile it on top)."""
        if self.cfg.compile_prefill:
            warmup = max(warmup, COMPILED_PREFILL_WARMUP_CALLS)
        with torch.no_grad():
            for _ in range(warmup):
                out = fn()
                del out
            self.clock.sync()
            times = []
            for _ in range(repeats):
                start = self.clock.mark()
                out = fn()
                end = self.clock.mark()
                self.clock.sync()
                del out
                times.append(self.clock.ms(start, end))
        return times

    def prefill_fn(self, inputs: Inputs) -> Callable[[], object]:
        kwargs = inputs.model_kwargs()
        return lambda: self.model(**kwargs, use_cache=True, logits_to_keep=1)

    def generate_kwargs(self, inputs: Inputs) -> dict:
        n = self.cfg.new_tokens
        return {
            **inputs.model_kwargs(),
            "max_new_tokens": n,
            "min_new_tokens": n,
            "do_sample": False,
            "num_beams": 1,
            **generation_kwargs(self.cfg.cache == STATIC_CACHE),
        }

    def time_generate(self, inputs: Inputs, repeats: int) -> dict:
        """e2e, in-generate TTFT and per-token decode of `repeats` generate calls (after warm-up calls, one of
        which also reads the KV cache).

        No hook marks the steps: a Python hook inside a compiled decode step (`--cache static` on a GPU) would
        be traced and recompiled on every call. TTFT is a one-token `generate` (prefill and first token) and
        decode = (e2e of N tokens - TTFT) / (N - 1), medians of each."""
        kwargs = self.generate_kwargs(inputs)
        first_only = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
        if self.cfg.cache == STATIC_CACHE:
            # Each subject's hooks are new guards for the compiled step: start every subject from a clean
            # compiler state rather than piling up recompilations until dynamo's limit falls back to eager.
            torch._dynamo.reset()
        with torch.no_grad():
            for _ in range(STATIC_WARMUP_CALLS - 1 if self.cfg.cache == STATIC_CACHE else 0):
                self.model.generate(**kwargs)
            self.model.generate(**first_only)
            out = self.model.generate(**kwargs, return_dict_in_generate=True)
            new = out.sequences.shape[1] - inputs.input_ids.shape[1]
            if new != self.cfg.new_tokens:
                raise RuntimeError(f"generate produced {new} tokens instead of {self.cfg.new_tokens}")
            kv = cache_bytes(compat.cache_from_output(out))
            del out
            self._reset_peak()
            e2e = self.time_calls(lambda: self.model.generate(**kwargs), repeats, warmup=0)
            ttft = self.time_calls(lambda: self.model.generate(**first_only), repeats, warmup=0)
            peak = self._peak()
        ttft_s = summarize(ttft)
        e2e_s = summarize(e2e)
        batch = inputs.batch
        return {
            "e2e_ms": e2e_s,
            "ttft_generate_ms": ttft_s,
            "decode_ms_per_token": decode_per_token(e2e, ttft_s["median"], self.cfg.new_tokens),
            "throughput_samples_s": batch * 1e3 / e2e_s["median"],
            "tokens_per_s": batch * self.cfg.new_tokens * 1e3 / e2e_s["median"],
            "peak_mem_generate_bytes": peak,
            "kv_cache_bytes": kv,
        }

    # --- one timed subject --------------------------------------------------------------------------------
    def measure(
        self, inputs: Inputs, method: Method | None, *, phases: bool = True, generate: bool = True
    ) -> tuple[dict, object]:
        """Everything for one subject: the unhooked model (method None) or a pruned one. Returns the timings
        and the PruneRecord of the last prefill (None when unhooked)."""
        cfg = self.cfg
        record = None
        self.new_subject()
        if method is not None:
            vtprune.prune(self.model, method)
        try:
            self._reset_peak()
            prefill = self.time_calls(self.prefill_fn(inputs), cfg.repeats, cfg.warmup)
            peak_prefill = self._peak()
            if method is not None:
                record = vtprune.last_record(self.model)
            result: dict = {"prefill_ms": summarize(prefill), "peak_mem_prefill_bytes": peak_prefill}
            if method is not None and phases:
                vtprune.prune(self.model, method, timing=True)
                fn = self.prefill_fn(inputs)
                per_key: dict[str, list[float]] = {}
                with torch.no_grad():
                    for _ in range(COMPILED_PREFILL_WARMUP_CALLS if cfg.compile_prefill else 0):
                        fn()  # the timing session's hooks are new guards: compile untimed
                    for _ in range(min(cfg.repeats, PHASE_REPEATS)):
                        out = fn()
                        del out
                        timings = vtprune.last_record(self.model).timings_ms
                        for key, value in timings.items():
                            per_key.setdefault(key, []).append(value)
                        select = sum(v for k, v in timings.items() if k.startswith("select"))
                        per_key.setdefault("select", []).append(select)
                result["phases_ms"] = {k: summarize(v) for k, v in per_key.items()}
                result["vision_ms"] = result["phases_ms"].get("vision")
                result["select_ms"] = result["phases_ms"].get("select")
                vtprune.prune(self.model, method)
            if generate:
                result.update(self.time_generate(inputs, cfg.generate_repeats or cfg.repeats))
        finally:
            if method is not None:
                vtprune.unprune(self.model)
        return result, record

    def image_features(self, inputs: Inputs):
        """The unmodified model's `get_image_features` on the inputs' images: vision tower and projector (on
        Qwen-VL the tower's merger), nothing of vtprune."""
        base = self.model.model
        if inputs.image_grid_thw is not None:  # Qwen-VL: flattened patches and their grids, no layer choice
            return base.get_image_features(inputs.pixel_values, inputs.image_grid_thw, return_dict=True)
        cfg = self.model.config
        return base.get_image_features(
            **inputs.image_kwargs(),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )

    def vision_tower(self, inputs: Inputs) -> dict:
        def encode():
            return self.image_features(inputs)

        self.new_subject()
        return {"vision_tower_ms": summarize(self.time_calls(encode, self.cfg.repeats, self.cfg.warmup))}

    def short_prompt(self, inputs: Inputs, keep: int) -> dict:
        """The unmodified model on a prompt holding `keep` image tokens: the vision tower and projector run as
        usual, `keep` of the image's own features (evenly spaced over the tokens it expands to: for LLaVA-NeXT
        the packed base view, unpadded tiles and newlines) are written into the prompt embeddings, and the
        forward takes `inputs_embeds`. Nothing of vtprune runs.

        Qwen-VL: the prompt keeps its vision start / end markers around the `keep` tokens; the positions are
        given (0 .. L'-1 on the three M-RoPE axes: what they are does not change the cost), since from
        `inputs_embeds` alone the model would reuse the `rope_deltas` of its last prompt."""
        p = inputs.visual_tokens
        start = inputs.image_start
        device = inputs.input_ids.device
        ids = torch.cat([inputs.input_ids[:, :start], inputs.input_ids[:, start + p - keep :]], dim=1).clone()
        ids[:, start : start + keep] = 0  # placeholders, overwritten by the image features
        mask = torch.ones_like(ids)
        index = torch.linspace(0, p - 1, keep, device=device).round().long()
        embed = self.model.get_input_embeddings()
        extra = {}
        if inputs.image_grid_thw is not None:
            extra["position_ids"] = torch.arange(ids.shape[1], device=device).expand(3, ids.shape[0], -1)

        self.new_subject()

        def forward():
            feats = compat.projected_image_features(self.image_features(inputs))[:, index]
            embeds = embed(ids)
            embeds[:, start : start + keep] = feats.to(embeds.dtype)
            return self.model(
                inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1, **extra
            )

        return {"prefill_ms": summarize(self.time_calls(forward, self.cfg.repeats, self.cfg.warmup))}

    def _profiled(self, fn: Callable[[], object]):
        """(profiler, wall ms) of one profiled call of `fn`."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            start = time.perf_counter()
            out = fn()
            self.clock.sync()
            wall = (time.perf_counter() - start) * 1e3
            del out
        return prof, wall

    def _table(self, prof) -> tuple[str, float | None]:
        """The top kernels/ops table of a profile and its GPU-busy ms (None on the CPU)."""
        averages = prof.key_averages()
        sort_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        try:
            table = averages.table(sort_by=sort_key, row_limit=15)
        except (AttributeError, KeyError, ValueError):
            table = averages.table(
                sort_by="self_cuda_time_total" if self.cuda else "self_cpu_time_total", row_limit=15
            )
        return table, gpu_busy_us(averages) / 1e3 if self.cuda else None

    @staticmethod
    def _head(label: str, wall: float, busy: float | None) -> str:
        busy_text = f", GPU busy {busy:.2f} ms" if busy is not None else ""
        return f"=== {label}: wall {wall:.2f} ms{busy_text} ===\n"

    def profile(self, inputs: Inputs, method: Method | None, label: str) -> tuple[str, dict]:
        """One profiled prefill (after a warm-up): the top kernels/ops table and GPU-busy vs wall time."""
        self.new_subject()
        if method is not None:
            vtprune.prune(self.model, method)
        try:
            fn = self.prefill_fn(inputs)
            self.time_calls(fn, 1, 1)
            prof, wall = self._profiled(fn)
        finally:
            if method is not None:
                vtprune.unprune(self.model)
        table, busy = self._table(prof)
        summary = {"label": label, "wall_ms": wall, "gpu_busy_ms": busy}
        return self._head(label, wall, busy) + table + "\n", summary

    def profile_decode(self, inputs: Inputs, method: Method | None, label: str) -> tuple[str, dict]:
        """Where a decode step's time goes: a profiled N-token and a profiled one-token generate (after the
        warm-up calls that compile a static cache's step); per token = (N-token - one-token) / (N - 1), for the
        wall time and for the GPU-busy time. A wall far above the GPU-busy time is time the GPU waits for the
        host. The table is the N-token call's."""
        kwargs = self.generate_kwargs(inputs)
        first_only = {**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}
        n = self.cfg.new_tokens
        self.new_subject()
        if method is not None:
            vtprune.prune(self.model, method)
        try:
            if self.cfg.cache == STATIC_CACHE:
                torch._dynamo.reset()
            with torch.no_grad():
                for _ in range(STATIC_WARMUP_CALLS if self.cfg.cache == STATIC_CACHE else 1):
                    self.model.generate(**kwargs)
                self.model.generate(**first_only)
            prof, wall = self._profiled(lambda: self.model.generate(**kwargs))
            prof1, wall1 = self._profiled(lambda: self.model.generate(**first_only))
        finally:
            if method is not None:
                vtprune.unprune(self.model)
        table, busy = self._table(prof)
        _, busy1 = self._table(prof1)
        steps = max(1, n - 1)
        per_token = (wall - wall1) / steps
        busy_per_token = None if busy is None else (busy - busy1) / steps
        summary = {
            "label": label,
            "decode_wall_ms_per_token": per_token,
            "decode_gpu_busy_ms_per_token": busy_per_token,
        }
        head = self._head(f"{label}: decode per token", per_token, busy_per_token)
        return head + f"({n}-token generate: wall {wall:.2f} ms)\n" + table + "\n", summary


# --------------------------------------------------------------------------------------------------------
# Per-configuration facts from the record (tokens, FLOPs, KV bytes)
# --------------------------------------------------------------------------------------------------------


def token_facts(record, visual_before: int, num_layers: int, text_tokens: int, batch: int) -> dict:
    """Per-sample token counts of one prefill (`record` None = unpruned)."""
    if record is None:
        per_layer = [[visual_before] * num_layers for _ in range(batch)]
        after, avg = [visual_before] * batch, [float(visual_before)] * batch
    else:
        per_layer = [record.layer_tokens(b) for b in range(record.batch_size)]
        after, avg = record.tokens_after_pruning, record.layer_avg_tokens
    return {
        "text": text_tokens,
        "visual_before": visual_before,
        "tokens_after_pruning": after,
        "layer_avg_tokens": avg,
        "layer_visual_tokens": per_layer,
    }


def flops_facts(
    spec: F.ArchSpec,
    tokens: dict,
    new_tokens: int,
    dtype_bytes: int,
    crops: int = 1,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """FLOPs (per sample, averaged over the batch's samples) and the theoretical KV bytes of the batch; the
    vision tower and projector run on `crops` tower inputs per sample (an AnyRes image's base view + tiles)
    of an image of `image_size` (what the Qwen-VL tower's cost depends on)."""
    text = tokens["text"]
    per_sample = [[text + v for v in layers] for layers in tokens["layer_visual_tokens"]]
    n = len(per_sample)
    true = [
        F.prefill_flops(spec, layer_tokens, crops=crops, image_size=image_size if spec.qwen else None)
        for layer_tokens in per_sample
    ]
    fastv = [F.fastv_convention_flops(spec, layer_tokens) for layer_tokens in per_sample]
    sparse = [F.sparsevlm_convention_flops(spec, layer_tokens) for layer_tokens in per_sample]
    kv = [
        F.kv_cache_bytes(spec, [t + new_tokens - 1 for t in layer_tokens], dtype_bytes)
        for layer_tokens in per_sample
    ]

    def mean(values):
        return sum(values) / n

    return {
        "flops": {
            "per": "sample",
            "true_total": mean([f["total"] for f in true]),
            "true_llm": mean([f["llm"] for f in true]),
            "true_lm_head": mean([f["lm_head"] for f in true]),
            "true_vision": mean([f["vision"] for f in true]),
            "true_projector": mean([f["projector"] for f in true]),
            "fastv_convention": mean(fastv),
            "sparsevlm_convention": mean(sparse),
        },
        "layer_tokens": per_sample[0],
        "kv_cache_bytes_theory_per_sample": kv,
    }


def decode_per_token(e2e_ms: list[float], ttft_ms: float, new_tokens: int) -> dict | None:
    """Per-token decode of each N-token generate call: (e2e - TTFT) / (N - 1), summarized. None when the
    median is not positive: the N - 1 steps took less than the two calls' noise (a few tokens, one repeat),
    so decode was not resolved; a negative time would be a wrong figure, not a small one."""
    summary = summarize([(t - ttft_ms) / max(1, new_tokens - 1) for t in e2e_ms])
    return summary if summary is not None and summary["median"] > 0 else None


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _median(timing: dict | None, key: str) -> float | None:
    if not timing or timing.get(key) is None:
        return None
    return timing[key]["median"]


def compare(entry: dict, unpruned: dict | None, vision_ms: float | None = None) -> None:
    """Overhead against the oracle and speed-ups against the unpruned model, in place.

    `speedup_vs_unpruned_llm` leaves the vision tower (the same `vision_ms` for every subject: the standalone
    tower time of this batch) out of both sides: the part of the prefill pruning can shrink.
    """
    method, oracle = entry.get("method_timing"), entry.get("oracle_timing")
    m, o = _median(method, "prefill_ms"), _median(oracle, "prefill_ms")
    entry["overhead_ms"] = None if m is None or o is None else m - o
    entry["overhead_pct"] = (
        None if entry["overhead_ms"] is None or not o else 100.0 * entry["overhead_ms"] / o
    )
    entry["prefill_vs_oracle"] = _ratio(m, o)
    u = _median(unpruned, "prefill_ms")
    entry["speedup_vs_unpruned"] = _ratio(u, m)
    entry["oracle_speedup_vs_unpruned"] = _ratio(u, o)
    if vision_ms is not None and u is not None and m is not None:
        entry["speedup_vs_unpruned_llm"] = _ratio(u - vision_ms, m - vision_ms)
        entry["oracle_speedup_vs_unpruned_llm"] = None if o is None else _ratio(u - vision_ms, o - vision_ms)
    me, oe = _median(method, "e2e_ms"), _median(oracle, "e2e_ms")
    entry["e2e_overhead_ms"] = None if me is None or oe is None else me - oe
    entry["e2e_speedup_vs_unpruned"] = _ratio(_median(unpruned, "e2e_ms"), me)
    md, ud = _median(method, "decode_ms_per_token"), _median(unpruned, "decode_ms_per_token")
    entry["decode_speedup_vs_unpruned"] = _ratio(ud, md)


# --------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------


def environment(loaded: BenchModel, cfg: BenchConfig) -> dict:
    import transformers

    device = loaded.device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine() or "cpu")
    )
    return {
        "schema": SCHEMA,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": name,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "attn": cfg.attn,
        "cache": cfg.cache,
        "compile_prefill": cfg.compile_prefill,
        "compile_mode": cfg.compile_mode if cfg.compile_prefill else None,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "model": loaded.name,
        "random_weights": loaded.random_weights,
        "weights_note": (
            "random weights with the real architecture: timings, memory and FLOPs are real; which tokens a "
            "method keeps is meaningless"
            if loaded.random_weights
            else "real checkpoint weights"
        ),
        "arch": dataclasses.asdict(loaded.spec),
        "visual_tokens_per_image": loaded.visual_tokens,
        "image": dataclasses.asdict(loaded.image),
        "image_note": loaded.image.describe(),
        "text_tokens": cfg.text_tokens,
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "weights_bytes": sum(p.numel() * p.element_size() for p in loaded.model.parameters()),
    }


def run_bench(
    cfg: BenchConfig, *, loaded: BenchModel | None = None, log: Callable[[str], None] | None = None
) -> dict:
    """Run the grid, writing `results.json` after every configuration, then the Markdown table and plots.

    Configurations run in the order given (batches, then methods, then budgets), so with a time budget the
    ones named first are the ones measured; whatever is left is recorded as skipped.
    """
    from vtprune.bench import report
    from vtprune.loading import resolve_device_dtype

    cfg.methods = expand_methods(cfg.methods)
    cfg.check()
    log = log or (lambda msg: None)
    device, dtype = resolve_device_dtype(cfg.device, cfg.dtype)
    t_start = time.perf_counter()
    if loaded is None:
        loaded = build_model(
            model=cfg.model,
            arch=cfg.arch,
            random_weights=cfg.random_weights,
            device=device,
            dtype=dtype,
            attn=cfg.attn,
            seed=cfg.seed,
            image_size=cfg.image_size,
        )
    elif cfg.image_size is not None:  # a model built by the caller, timed on another image size
        loaded = dataclasses.replace(loaded, image=image_of(loaded.model, loaded.spec, tuple(cfg.image_size)))
    keeps = resolve_keeps(cfg.keeps, loaded.visual_tokens, loaded.image.describe())
    out_dir = Path(cfg.output) if cfg.output is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    grid = _Grid(Bench(loaded, cfg), cfg, keeps, device, dtype, log, t_start)
    results = grid.results
    results["meta"]["build_s"] = time.perf_counter() - t_start

    def save() -> None:
        if out_dir is not None:
            _write_json(out_dir / "results.json", results)

    cells: list[tuple[str, int, int | None]] = []
    for batch in cfg.batches:
        cells.append(("reference", batch, None))
        for name in cfg.methods:
            for keep in [None] if name == "none" else keeps:
                cells.append((name, batch, keep))
    compiled = contextlib.nullcontext()
    if cfg.compile_prefill:
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        compiled = compiled_prefill(loaded.model, mode=mode, dynamic=False)
    with compiled, report.progress(len(cells), enabled=cfg.progress) as advance:
        for kind, batch, keep in cells:
            if kind == "reference":
                results["references"].append(grid.reference(batch))
            else:
                results["results"].append(grid.cell(kind, batch, keep))
            save()
            advance()
        results["targets"] = report.target_checks(results)
        profile_text = grid.profiles() if cfg.profile else []
    results["meta"]["total_s"] = time.perf_counter() - t_start
    save()
    if out_dir is not None:
        (out_dir / "results.md").write_text(report.markdown(results))
        report.plots(results, out_dir)
        if profile_text:
            (out_dir / "profile.txt").write_text("".join(profile_text))
    return results


class _Grid:
    """The state of one bench run: inputs per batch, the unpruned references, the results so far."""

    def __init__(self, bench: Bench, cfg: BenchConfig, keeps: list[int], device, dtype, log, t_start: float):
        self.bench = bench
        self.cfg = cfg
        self.keeps = keeps
        self.device = device
        self.dtype = dtype
        self.log = log
        self.t_start = t_start
        loaded = bench.loaded
        self.loaded = loaded
        self.visual = loaded.visual_tokens
        self.crops = loaded.image.crops
        self.image_size = loaded.image.size
        self.dtype_bytes = torch.tensor([], dtype=loaded.dtype).element_size()
        self.unpruned: dict[int, dict] = {}
        self.config_errors: dict[str, str] = {}
        self.vision: dict[int, float] = {}
        self._inputs: dict[int, Inputs] = {}
        self.results: dict = {
            "meta": environment(loaded, cfg),
            "config": {
                "methods": cfg.methods,
                "params": cfg.params,
                "keeps": keeps,
                "batches": cfg.batches,
                "oracle": cfg.oracle,
                "oracle_generate": cfg.oracle_generate,
                "generate_repeats": cfg.generate_repeats or cfg.repeats,
                "phase_repeats": min(cfg.repeats, PHASE_REPEATS),
                "profile": cfg.profile,
                "time_budget_s": cfg.time_budget_s,
                "seed": cfg.seed,
            },
            "references": [],
            "results": [],
            "profiles": [],
        }

    def flops(self, tokens: dict) -> dict:
        """`flops_facts` of one subject's tokens on this run's model and image."""
        return flops_facts(
            self.loaded.spec, tokens, self.cfg.new_tokens, self.dtype_bytes, self.crops, self.image_size
        )

    def over_budget(self) -> bool:
        return (
            self.cfg.time_budget_s is not None and time.perf_counter() - self.t_start > self.cfg.time_budget_s
        )

    def inputs(self, batch: int) -> Inputs:
        if batch not in self._inputs:
            self._inputs = {  # one batch's inputs alive at a time
                batch: synthetic_inputs(
                    self.loaded.model,
                    batch,
                    self.cfg.text_tokens,
                    device=self.device,
                    dtype=self.dtype,
                    seed=self.cfg.seed,
                    image_size=self.loaded.image.size,
                )
            }
        return self._inputs[batch]

    def _failed(self, item: dict, err: Exception, what: str) -> None:
        item["status"] = "skipped" if isinstance(err, TimeoutError) else "error"
        item["error"] = f"{type(err).__name__}: {err}"
        if item["status"] == "error":
            item["traceback"] = traceback.format_exc(limit=-12)
        if self.bench.cuda:
            torch.cuda.empty_cache()  # after an out-of-memory error the next configuration starts clean
        self.log(f"{what}: {item['error']}")

    def reference(self, batch: int) -> dict:
        cfg, bench = self.cfg, self.bench
        ref: dict = {"kind": "unpruned", "batch": batch, "status": "ok"}
        try:
            if self.over_budget():
                raise TimeoutError("time budget exhausted")
            inputs = self.inputs(batch)
            timing, _ = bench.measure(inputs, None)
            ref["timing"] = timing
            ref.update(bench.vision_tower(inputs))
            tokens = token_facts(None, self.visual, self.loaded.spec.num_layers, cfg.text_tokens, batch)
            ref["tokens"] = tokens
            ref.update(self.flops(tokens))
            ref["short_prompt"] = {str(k): bench.short_prompt(inputs, k) for k in self.keeps}
            self.unpruned[batch] = timing
            self.vision[batch] = ref["vision_tower_ms"]["median"]
            self.log(
                f"B={batch} unpruned: prefill {timing['prefill_ms']['median']:.2f} ms, vision tower "
                f"{self.vision[batch]:.2f} ms, e2e {timing['e2e_ms']['median']:.1f} ms"
            )
        except Exception as err:  # noqa: BLE001 - a failed cell is recorded, the grid goes on
            self._failed(ref, err, f"B={batch} unpruned")
        return ref

    def cell(self, name: str, batch: int, keep: int | None) -> dict:
        cfg, bench = self.cfg, self.bench
        params = cfg.params.get(name, {})
        entry: dict = {
            "method": method_label(name, params),
            "name": name,
            "params": params,
            "stage": method_class(name).stage_kind,
            "keep": keep,
            "batch": batch,
            "status": "ok",
        }
        try:
            if self.over_budget():
                raise TimeoutError("time budget exhausted")
            if name in self.config_errors:
                raise PruneConfigError(f"not run: {self.config_errors[name]}")
            inputs = self.inputs(batch)
            method = make_method(name, keep=keep, **params)
            timing, record = bench.measure(inputs, method)
            entry["method_timing"] = timing
            entry["record"] = record.summary() if record is not None else None
            if cfg.compile_prefill:  # a method pruning inside the tower or the stack keeps that part eager
                entry["prefill_compiled"] = compiled_parts({stage.kind for stage in record.stages})
            pruned = record if name != "none" else None
            tokens = token_facts(pruned, self.visual, self.loaded.spec.num_layers, cfg.text_tokens, batch)
            entry["tokens"] = tokens
            entry.update(self.flops(tokens))
            if name == "none":
                entry["oracle_timing"] = self.unpruned.get(batch)
                entry["oracle"] = "unpruned model, no hooks"
            elif cfg.oracle:
                oracle = FixedSelection.from_record(record)
                oracle_timing, oracle_record = bench.measure(
                    inputs, oracle, phases=False, generate=cfg.oracle_generate
                )
                entry["oracle_timing"] = oracle_timing
                entry["oracle"] = "FixedSelection replay of the method's record"
                entry["oracle_exact"] = [s.kept for s in oracle_record.stages] == [
                    s.kept for s in record.stages
                ]
            compare(entry, self.unpruned.get(batch), self.vision.get(batch))
            self.log(_cell_line(entry))
        except Exception as err:  # noqa: BLE001 - a failed method is recorded, the grid goes on
            if isinstance(err, PruneConfigError) and name not in self.config_errors:
                # A configuration the model refuses (a layer out of range, a checkpoint that cannot be
                # loaded) fails the same way at every budget: the method's other cells are not run.
                self.config_errors[name] = f"{err} (raised at keep={keep}, batch={batch})"
            self._failed(entry, err, f"{entry['method']} keep={keep} B={batch}")
        return entry

    def profiles(self) -> list[str]:
        """Profile one prefill of the unpruned model and, for every method that missed a target at the largest
        batch, of the method and its oracle at the budget where it is furthest over its oracle (worst method
        first); text for profile.txt."""
        batch = max(self.cfg.batches)
        missed_keeps: dict[str, set] = {}
        for check in self.results.get("targets", []):
            if check["met"] is False and check["batch"] == batch:
                missed_keeps.setdefault(check["method"], set()).add(check["keep"])
        worst: dict[str, tuple[float, int]] = {}  # method name -> (prefill / oracle, keep) of its worst miss
        for e in self.results["results"]:
            keeps = missed_keeps.get(method_label(e["name"], self.cfg.params.get(e["name"], {})), set())
            if e["status"] == "ok" and e["batch"] == batch and e["keep"] in keeps:
                ratio = e.get("prefill_vs_oracle") or 0.0
                if e["name"] not in worst or ratio > worst[e["name"]][0]:
                    worst[e["name"]] = (ratio, e["keep"])
        names = sorted(worst, key=lambda n: -worst[n][0])
        subjects: list[tuple[str, Method | None]] = [("unpruned", None)]
        text: list[str] = []
        inputs = self.inputs(batch)
        for name in names:
            keep = worst[name][1]
            try:
                method = make_method(name, keep=keep, **self.cfg.params.get(name, {}))
                vtprune.prune(self.loaded.model, method)
                with torch.no_grad():
                    self.bench.prefill_fn(inputs)()
                record = vtprune.last_record(self.loaded.model)
                vtprune.unprune(self.loaded.model)
                subjects += [
                    (f"{name} keep={keep}", method),
                    (f"oracle of {name} keep={keep}", FixedSelection.from_record(record)),
                ]
            except Exception as err:  # noqa: BLE001
                text.append(f"=== {name}: {type(err).__name__}: {err} ===\n")
        text += self._profile_each(self.bench.profile, inputs, subjects, f"B={batch}")
        return text + self.decode_profiles()

    def _profile_each(self, profile: Callable, inputs: Inputs, subjects: list, prefix: str) -> list[str]:
        """`profile(inputs, method, label)` for each (label, method); a failure is reported, not raised."""
        text = []
        for label, method in subjects:
            try:
                table, summary = profile(inputs, method, f"{prefix} {label}")
                text.append(table)
                self.results["profiles"].append(summary)
            except Exception as err:  # noqa: BLE001
                text.append(f"=== {prefix} {label}: {type(err).__name__}: {err} ===\n")
        return text

    def decode_profiles(self) -> list[str]:
        """Profile the batch-1 decode of the unpruned model and of the first methods that missed the decode
        target (at the budget the target checks); text for profile.txt."""
        targets = self.results.get("targets", [])
        missed = [c for c in targets if c["met"] is False and c["check"].startswith("batch-1 decode")]
        if not missed or 1 not in self.cfg.batches:
            return []
        keep = next((c["keep"] for c in missed if c["method"] != "unpruned"), None)
        labels = {c["method"] for c in missed}
        subjects: list[tuple[str, Method | None]] = [("unpruned", None)]
        for name in self.cfg.methods:
            params = self.cfg.params.get(name, {})
            if name != "none" and keep is not None and method_label(name, params) in labels:
                subjects.append((f"{name} keep={keep}", make_method(name, keep=keep, **params)))
        return self._profile_each(
            self.bench.profile_decode, self.inputs(1), subjects[: 1 + PROFILE_MAX_DECODE_METHODS], "B=1"
        )


def _cell_line(entry: dict) -> str:
    m = _median(entry.get("method_timing"), "prefill_ms")
    o = _median(entry.get("oracle_timing"), "prefill_ms")
    parts = [f"{entry['method']} keep={entry['keep']} B={entry['batch']}: prefill {m:.2f} ms"]
    if o is not None:
        parts.append(f"oracle {o:.2f} ms ({entry['overhead_ms']:+.2f} ms)")
    if entry.get("speedup_vs_unpruned"):
        parts.append(f"{entry['speedup_vs_unpruned']:.2f}x vs unpruned")
    return ", ".join(parts)
