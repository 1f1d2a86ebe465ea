"""`vtprune bench` on the tiny model (CPU): files and keys, oracle replay, FLOPs/KV arithmetic, CLI, errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

import vtprune
from vtprune.analysis.plots import assert_png_ok
from vtprune.bench import flops as F
from vtprune.bench.oracle import FixedSelection
from vtprune.bench.report import target_checks
from vtprune.bench.runner import BenchConfig, cache_bytes, run_bench
from vtprune.bench.timing import summarize
from vtprune.bench.workload import build_model, init_random_weights, synthetic_inputs
from vtprune.methods.base import METHODS, Method, ModelInfo, PruneConfigError, Selection, Stage
from vtprune.selection import topk_indices

METHODS_UNDER_TEST = ["none", "fastv", "random"]
KEEPS = [64, 16]
BATCHES = [1, 2]
NEW_TOKENS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is far faster on one thread than on oversubscribed cores (CI runners share them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(model=None, arch="tiny", random_weights=False, device="cpu", dtype=torch.float32)


def _cpu_run(loaded, out, **config):
    """One CPU bench run of a tiny model; `config` holds what differs between the runs below."""
    config = {"batches": BATCHES, "new_tokens": NEW_TOKENS, **config}
    cfg = BenchConfig(device="cpu", dtype="float32", output=out, progress=False, **config)
    return run_bench(cfg, loaded=loaded), out


@pytest.fixture(scope="module")
def bench_run(tiny_model, tmp_path_factory):
    return _cpu_run(tiny_model, tmp_path_factory.mktemp("bench"), arch="tiny", methods=METHODS_UNDER_TEST,
                    keeps=KEEPS, repeats=2, warmup=1)


def ok_entries(results):
    return [e for e in results["results"] if e["status"] == "ok"]


# --- end to end ------------------------------------------------------------------------------------------


def test_writes_json_markdown_and_plots(bench_run):
    results, out = bench_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["meta"]["schema"] == "vtprune.bench/1"
    for key in (
        "device_name",
        "date",
        "torch",
        "transformers",
        "attn",
        "dtype",
        "random_weights",
        "weights_note",
        "text_tokens",
        "new_tokens",
        "repeats",
        "warmup",
        "weights_bytes",
    ):
        assert key in on_disk["meta"], key
    assert on_disk["meta"]["random_weights"] is True and on_disk["meta"]["attn"] == "sdpa"
    md = (out / "results.md").read_text()
    assert "## Batch 1" in md and "## Batch 2" in md and "oracle prefill ms" in md and "## Targets" in md
    for stem in ("prefill_vs_tokens", "pareto"):
        assert_png_ok(out / f"{stem}.png", min_size=(400, 300))
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"


def test_every_configuration_ran_with_method_and_oracle_timings(bench_run):
    results, _ = bench_run
    entries = results["results"]
    assert all(e["status"] == "ok" for e in entries), [e.get("error") for e in entries]
    expected = {(m, k, b) for m in METHODS_UNDER_TEST if m != "none" for k in KEEPS for b in BATCHES}
    expected |= {("none", None, b) for b in BATCHES}
    assert {(e["name"], e["keep"], e["batch"]) for e in entries} == expected
    timing_keys = (
        "prefill_ms",
        "e2e_ms",
        "ttft_generate_ms",
        "decode_ms_per_token",
        "throughput_samples_s",
        "tokens_per_s",
        "kv_cache_bytes",
        "peak_mem_prefill_bytes",
        "peak_mem_generate_bytes",
    )
    for e in entries:
        for side in ("method_timing", "oracle_timing"):
            timing = e[side]
            assert timing is not None, (e["method"], side)
            for key in timing_keys:
                assert key in timing, (e["method"], side, key)
            assert timing["prefill_ms"]["median"] > 0 and timing["prefill_ms"]["n"] == 2
            assert (
                timing["prefill_ms"]["min"] <= timing["prefill_ms"]["median"] <= timing["prefill_ms"]["max"]
            )
        assert e["method_timing"]["vision_ms"]["median"] > 0
        assert e["method_timing"]["select_ms"] is not None
        for key in ("overhead_ms", "overhead_pct", "prefill_vs_oracle", "speedup_vs_unpruned"):
            assert isinstance(e[key], float), (e["method"], key)
        if e["name"] != "none":
            assert e["oracle_exact"] is True
    refs = results["references"]
    assert [r["batch"] for r in refs] == BATCHES
    for ref in refs:
        assert ref["status"] == "ok"
        assert set(ref["short_prompt"]) == {str(k) for k in KEEPS}
        assert ref["vision_tower_ms"]["median"] > 0


def test_flops_and_tokens_match_bench_flops(bench_run, tiny_model):
    results, _ = bench_run
    spec = tiny_model.spec
    text = results["meta"]["text_tokens"]
    for e in ok_entries(results):
        # Per-layer tokens rebuilt from the recorded stages with bench/flops.py's own accounting.
        stages = [
            (s["prune_layer"] or 0, s["counts"][0]) for s in e["record"]["stages"] if s["name"] != "none"
        ]
        expected_layers = F.layer_tokens_for_stages(spec.num_layers, text, spec.visual_tokens, stages)
        assert e["layer_tokens"] == expected_layers
        assert e["tokens"]["tokens_after_pruning"][0] == F.tokens_after_pruning(spec.visual_tokens, stages)
        assert e["tokens"]["layer_avg_tokens"][0] == pytest.approx(
            F.layer_avg_visual_tokens(spec.num_layers, spec.visual_tokens, stages)
        )
        true = F.prefill_flops(spec, expected_layers)
        assert e["flops"]["true_total"] == true["total"]
        assert e["flops"]["true_llm"] == true["llm"]
        assert e["flops"]["fastv_convention"] == F.fastv_convention_flops(spec, expected_layers)
        # KV bytes read from the cache object equal the arithmetic (prompt + N-1 tokens per layer).
        theory = F.kv_cache_bytes(spec, [t + NEW_TOKENS - 1 for t in expected_layers], 4, batch=e["batch"])
        assert sum(e["kv_cache_bytes_theory_per_sample"]) == theory
        assert e["method_timing"]["kv_cache_bytes"] == theory
        assert e["oracle_timing"]["kv_cache_bytes"] == theory
    for e in ok_entries(results):
        if e["name"] == "fastv" and e["keep"] == 16:
            assert e["tokens"]["layer_avg_tokens"][0] == pytest.approx((2 * 64 + 2 * 16) / 4)


def test_targets_are_checked_on_the_largest_batch(bench_run):
    results, _ = bench_run
    checks = results["targets"]
    assert checks and all(c["batch"] == max(BATCHES) for c in checks if not c["check"].startswith("batch-1"))
    speed = {c["method"]: c for c in checks if c["check"].startswith("prefill speed-up")}
    assert speed["random"]["threshold"] == 4.5 and speed["fastv"]["threshold"] == 3.5  # fastv K=2


# --- the oracle -------------------------------------------------------------------------------------------


@dataclass
class _ThreeStages(Method):
    """Test-only (unregistered): random vision stage, then two LLM stages, to exercise the replay mapping."""

    name = "_three_stages"
    stage_kind = "vision+llm"

    def stages(self, info: ModelInfo) -> list[Stage]:
        return [
            Stage(kind="vision", keep=40, name="v"),
            Stage(kind="llm", keep=20, score_layer=1, prune_layer=1, name="l1"),
            Stage(kind="llm", keep=7, score_layer=2, prune_layer=2, positions="reindex", name="l2"),
        ]

    def select(self, stage_index, stage, signals) -> Selection:
        if stage.kind == "vision":
            rows, n = signals.projected.shape[:2]
            keep = stage.keep
        else:
            rows, n = signals.visual_index.shape
            keep = stage.keep * signals.images_per_sample
        gen = torch.Generator().manual_seed(11 + stage_index)
        scores = torch.rand(rows, n, generator=gen)
        return Selection(*topk_indices(scores, keep))


@pytest.mark.parametrize(
    "method",
    [
        "fastv",
        "random",
        "vispruner",
        "vispruner_nosink",
        "visionzip",
        "three",
        "dart",
        "scope",
        "hiprune",
        "holov",
    ],
)
def test_oracle_replays_exactly_the_recorded_kept_sets(tiny_model, method):
    """Fixed, adaptive (invalid slots), created tokens (VisionZip: [CLS] and contextual tokens) and three stages."""
    if method != "three" and method not in {m.name for m in vtprune.list_methods()}:
        pytest.skip(f"{method} is not registered")
    model = tiny_model.model
    inputs = synthetic_inputs(model.config, 2, 20, device="cpu", dtype=torch.float32, seed=3)
    obj = _ThreeStages() if method == "three" else vtprune.get_method(method, keep=12)
    with torch.no_grad():
        vtprune.prune(model, obj)
        model(**inputs.model_kwargs())
        record = vtprune.last_record(model)
        oracle = FixedSelection.from_record(record)
        vtprune.prune(model, oracle)
        for _ in range(2):  # the second call uses the cached index tensors
            model(**inputs.model_kwargs())
            replay = vtprune.last_record(model)
            assert [(s.kind, s.prune_layer, s.positions, s.kept) for s in replay.stages] == [
                (s.kind, s.prune_layer, s.positions, s.kept) for s in record.stages
            ]
        vtprune.unprune(model)
    assert "oracle" not in METHODS  # never registered


def test_oracle_scores_nothing(tiny_model):
    """The oracle of an attention method captures no LLM attention (score layer == prune layer, no queries)."""
    model = tiny_model.model
    inputs = synthetic_inputs(model.config, 1, 20, device="cpu", dtype=torch.float32)
    with torch.no_grad(), vtprune.pruned(model, "fastv", keep=8):
        model(**inputs.model_kwargs())
        record = vtprune.last_record(model)
    oracle = FixedSelection.from_record(record)
    (stage,) = oracle.stages(None)
    assert stage.score_layer == stage.prune_layer == 2 and stage.queries is None
    assert oracle.params() == {"replays": "fastv"}


def test_oracle_of_unpruned_record_has_no_stage(tiny_model):
    model = tiny_model.model
    inputs = synthetic_inputs(model.config, 1, 20, device="cpu", dtype=torch.float32)
    with torch.no_grad(), vtprune.pruned(model, "none"):
        model(**inputs.model_kwargs())
        record = vtprune.last_record(model)
    assert FixedSelection.from_record(record).stages(None) == []


def test_oracle_rejects_another_batch(tiny_model):
    model = tiny_model.model
    one = synthetic_inputs(model.config, 1, 20, device="cpu", dtype=torch.float32)
    two = synthetic_inputs(model.config, 2, 20, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        with vtprune.pruned(model, "random", keep=8):
            model(**one.model_kwargs())
            record = vtprune.last_record(model)
        with (
            vtprune.pruned(model, FixedSelection.from_record(record)),
            pytest.raises(PruneConfigError, match="sample"),
        ):
            model(**two.model_kwargs())


# --- pieces -------------------------------------------------------------------------------------------------


def test_synthetic_inputs_layout(tiny_model):
    cfg = tiny_model.model.config
    inputs = synthetic_inputs(cfg, 3, 60, device="cpu", dtype=torch.float32)
    ids = inputs.input_ids
    assert ids.shape == (3, 60 + 64)
    assert int((ids[0] == cfg.image_token_id).sum()) == 64
    assert bool((ids[:, inputs.image_start : inputs.image_start + 64] == cfg.image_token_id).all())
    assert bool((ids == ids[0]).all()) and bool(inputs.attention_mask.all())
    assert inputs.pixel_values.shape == (3, 3, 112, 112)


def test_random_weights_from_an_arch_spec():
    """The --random-weights path on the real module layout (a small ArchSpec, so it runs on a CPU)."""
    from vtprune.bench.workload import _random_model

    spec = F.ArchSpec(
        name="mini",
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        vocab_size=300,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_layers=2,
        vision_heads=2,
        image_size=56,
        patch_size=14,
        image_token_index=260,
        pad_token_id=261,
    )
    model = _random_model(F.llava_config(spec), torch.device("cpu"), torch.bfloat16, "sdpa", seed=0)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params.values())
    assert bool((params["model.language_model.norm.weight"] == 1).all())
    assert abs(float(params["lm_head.weight"].detach().float().std()) - 0.02) < 0.005
    assert sum(p.numel() for p in params.values()) == spec.param_counts()["total"]
    inputs = synthetic_inputs(model.config, 2, 10, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(**inputs.model_kwargs(), logits_to_keep=1)
    assert out.logits.shape == (2, 1, 300)


def test_init_random_weights_is_deterministic(tiny_model):
    import copy

    a, b = copy.deepcopy(tiny_model.model), copy.deepcopy(tiny_model.model)
    init_random_weights(a, seed=5)
    init_random_weights(b, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_build_model_from_a_local_checkpoint(tmp_path):
    from vtprune.testing import save_tiny_llava

    path = save_tiny_llava(tmp_path / "ckpt")
    real = build_model(model=str(path), arch=None, random_weights=False, device="cpu", dtype=torch.float32)
    rand = build_model(model=str(path), arch=None, random_weights=True, device="cpu", dtype=torch.float32)
    assert not real.random_weights and rand.random_weights
    assert real.visual_tokens == rand.visual_tokens == 64


def test_summarize_and_cache_bytes():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s == {"median": 2.5, "min": 1.0, "max": 10.0, "p25": 1.75, "p75": 4.75, "n": 4}
    assert summarize([]) is None
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.zeros(2, 4, 5, 8), torch.zeros(2, 4, 5, 8), 0)
    cache.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 1)
    assert cache_bytes(cache) == 2 * 4 * 8 * 4 * 2 * (5 + 3)
    assert cache_bytes(None) is None


def test_target_checks_thresholds():
    def entry(name, stage, keep, ratio, speed, layer=None):
        stages = (
            [{"kind": "llm", "prune_layer": layer}]
            if layer is not None
            else [{"kind": "vision", "prune_layer": None}]
        )
        return {
            "status": "ok",
            "name": name,
            "method": name,
            "stage": stage,
            "keep": keep,
            "batch": 16,
            "prefill_vs_oracle": ratio,
            "speedup_vs_unpruned": speed,
            "record": {"stages": stages},
        }

    results = {
        "results": [
            entry("vispruner", "vision", 64, 1.02, 4.6),
            entry("fastv", "llm", 64, 1.08, 3.4, layer=2),
            entry("pdrop", "llm", 64, 1.0, 3.0, layer=8),
            entry("vispruner", "vision", 576, 1.2, 1.0),
        ]
    }
    checks = {(c["check"], c["method"]): c for c in target_checks(results)}
    assert checks[("prefill <= 1.05 x oracle", "vispruner")]["met"] is True  # the 576 budget is not checked
    assert checks[("prefill <= 1.05 x oracle", "fastv")]["met"] is False
    assert checks[("prefill <= 1.05 x oracle", "pdrop")]["met"] is True
    speed = {c["method"]: c for c in target_checks(results) if c["check"].startswith("prefill speed")}
    assert (
        speed["vispruner"]["met"] is True and speed["fastv"]["met"] is False and speed["pdrop"]["met"] is None
    )


# --- input checks and the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": ["nope"]}, "unknown method"),
        ({"keeps": [0]}, "--keep"),
        ({"batches": [0]}, "--batch"),
        ({"new_tokens": 1}, "--new-tokens"),
        ({"params": {"fastv": {"R": 2.0}}}, "fastv"),
        ({"params": {"random": {"seed": 1}}, "methods": ["fastv"]}, "not benchmarked"),
        ({"cache": "paged"}, "valid: dynamic, static"),
        ({"compile_mode": "fast"}, "valid: default, reduce-overhead"),
    ],
)
def test_bad_configuration_is_refused_before_anything_runs(kwargs, match):
    cfg = BenchConfig(arch="tiny", device="cpu", progress=False, **kwargs)
    with pytest.raises(PruneConfigError, match=match):
        run_bench(cfg)


def test_static_cache_bench_times_every_subject(tiny_model, tmp_path):
    """`--cache static`: generate() preallocates the KV cache (and compiles decode on a GPU); every subject
    generates exactly the asked tokens (static == dynamic tokens: test_engine.py), the cache kind is recorded.
    Decode per token is a difference of two timed generate calls: enough tokens and repeats that ten decode
    steps outweigh a shared CPU's noise (with 3 tokens and one repeat it went negative in CI)."""
    results, _ = _cpu_run(tiny_model, tmp_path, arch="tiny", methods=["none", "fastv", "vispruner"], keeps=[16],
                          batches=[1], new_tokens=12, repeats=3, warmup=0, cache="static")
    assert results["meta"]["cache"] == "static"
    entries = ok_entries(results)
    assert {e["method"] for e in entries} >= {"fastv", "vispruner"} and len(entries) == len(results["results"])
    assert all(e["method_timing"]["decode_ms_per_token"]["median"] > 0 for e in entries)


def test_compiled_prefill_bench_compiles_every_subject(tiny_model, tmp_path, monkeypatch):
    """`--compile-prefill`: every subject's prefill runs inside `compiled_prefill` (here with dynamo's eager
    backend: traced graphs, no code generation), each from a clean compiler state: the unpruned reference, its
    vision tower and short prompts, the methods and their oracles; the report names it."""
    import functools

    from vtprune.bench import runner
    from vtprune.compiled import compiled_prefill

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(runner, "compiled_prefill", functools.partial(compiled_prefill, backend=backend))
    resets = []
    original_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), original_reset()))
    results, out = _cpu_run(tiny_model, tmp_path, arch="tiny", methods=["none", "visionzip", "fastv"], keeps=[16],
                            batches=[1], repeats=1, warmup=0, compile_prefill=True, compile_mode="default")
    assert results["meta"]["compile_prefill"] is True
    entries = ok_entries(results)
    assert len(entries) == len(results["results"]) == 3
    # subjects: reference, vision tower, short prompt, none, visionzip + oracle, fastv + oracle
    assert len(resets) >= 8 and len(graphs) >= 8
    assert not hasattr(tiny_model.model, "_vtprune_compiled_prefill")  # restored after the run
    assert {e["method"]: e["prefill_compiled"] for e in entries} == {
        "none": ["vision tower", "decoder stack"],
        "visionzip": ["vision tower", "decoder stack"],
        "fastv": ["vision tower"],  # prunes inside the decoder stack: that stays eager
    }
    checks = {c["method"]: c["check"] for c in results["targets"] if c["check"].startswith("batch-1 prefill")}
    assert checks["visionzip"].endswith("(prefill compiled)")
    assert checks["fastv"].endswith("(prefill compiled: vision tower only)")
    assert "prefill compiled (`--compile-prefill`, mode default)" in (out / "results.md").read_text()


def test_bad_model_choice_is_refused():
    with pytest.raises(PruneConfigError, match="random-weights"):
        build_model(model=None, arch="llava-1.5-7b", random_weights=False, device="cpu", dtype=torch.float32)
    with pytest.raises(PruneConfigError, match="exactly one"):
        build_model(model=None, arch=None, random_weights=False, device="cpu", dtype=torch.float32)
    with pytest.raises(PruneConfigError, match="attention"):
        build_model(
            model=None, arch="tiny", random_weights=False, device="cpu", dtype=torch.float32, attn="xformers"
        )


def test_a_configuration_error_fails_the_method_not_the_run(tiny_model, tmp_path):
    cfg = BenchConfig(
        arch="tiny",
        methods=["fastv", "random"],
        params={"fastv": {"K": 9}},
        keeps=[16, 8],
        batches=[1],
        new_tokens=2,
        repeats=1,
        warmup=0,
        device="cpu",
        dtype="float32",
        output=tmp_path,
        progress=False,
    )
    results = run_bench(cfg, loaded=tiny_model)
    by = {(e["name"], e["keep"]): e for e in results["results"]}
    assert by[("fastv", 16)]["status"] == "error" and "prune layer 9" in by[("fastv", 16)]["error"]
    assert by[("fastv", 8)]["status"] == "error" and "not run" in by[("fastv", 8)]["error"]
    assert by[("random", 16)]["status"] == by[("random", 8)]["status"] == "ok"
    assert "prune layer 9" in (tmp_path / "results.md").read_text()


def test_keep_larger_than_the_image_is_refused(tiny_model):
    cfg = BenchConfig(arch="tiny", keeps=[576], device="cpu", dtype="float32", progress=False)
    with pytest.raises(PruneConfigError, match="576"):
        run_bench(cfg, loaded=tiny_model)


def test_cli_bench_command(tmp_path):
    from vtprune.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--arch",
            "tiny",
            "--methods",
            "random",
            "--keep",
            "8",
            "--batch",
            "1",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--param",
            "random.seed=4",
            "--no-oracle-generate",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    (entry,) = data["results"]
    assert entry["method"] == "random(seed=4)" and entry["params"] == {"seed": 4} and entry["status"] == "ok"
    assert "prefill_ms" in entry["oracle_timing"] and "e2e_ms" not in entry["oracle_timing"]
    assert entry["oracle_exact"] is True and entry["e2e_overhead_ms"] is None
    assert "| random(seed=4) | 8 |" in (out / "results.md").read_text()


def test_cli_rejects_malformed_lists(tmp_path):
    from vtprune.cli import app

    result = CliRunner().invoke(
        app, ["bench", "--arch", "tiny", "--keep", "64,abc", "--output", str(tmp_path)]
    )
    assert result.exit_code != 0 and "integers" in result.output


def test_oracle_of_a_vit_merging_method_feeds_the_same_tokens(tiny_model):
    """iLLaVA's ViT stage is replayed as a vision stage keeping the surviving patches (unmerged)."""
    model = tiny_model.model
    inputs = synthetic_inputs(model.config, 2, 20, device="cpu", dtype=torch.float32, seed=3)
    with torch.no_grad():
        vtprune.prune(model, "illava", keep=12, vit_layers=(0,), vit_remove=8)
        model(**inputs.model_kwargs())
        record = vtprune.last_record(model)
        vtprune.prune(model, FixedSelection.from_record(record))
        model(**inputs.model_kwargs())
        replay = vtprune.last_record(model)
        vtprune.unprune(model)
    assert [s.kind for s in record.stages] == ["vit", "llm"]
    assert [s.kind for s in replay.stages] == ["vision", "llm"]
    assert [(s.prune_layer, s.kept) for s in replay.stages] == [(s.prune_layer, s.kept) for s in record.stages]


# --- LLaVA-NeXT (AnyRes): the tiny NeXT, 112 x 112 image = 5 tower inputs, 88 tokens --------------------------

NEXT_METHODS = ["none", "random", "vispruner", "fastv", "pdrop"]
NEXT_PARAMS = {"pdrop": {"layer_list": (1, 2, 3)}}  # the paper's layers [2, 10, 20] need 21+ LLM layers
NEXT_KEEPS = [40, 12]
NEXT_TOKENS = 88  # 16 base + 8 x 8 tiles + 8 newlines


@pytest.fixture(scope="module")
def tiny_next_model():
    return build_model(model=None, arch="tiny-next", random_weights=False, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def next_run(tiny_next_model, tmp_path_factory):
    return _cpu_run(tiny_next_model, tmp_path_factory.mktemp("bench-next"), arch="tiny-next",
                    methods=NEXT_METHODS, keeps=NEXT_KEEPS, params=NEXT_PARAMS, repeats=1, warmup=0)


def test_next_every_method_runs_beside_its_oracle(next_run):
    results, out = next_run
    entries = results["results"]
    assert all(e["status"] == "ok" for e in entries), [e.get("error") for e in entries]
    expected = {(m, k, b) for m in NEXT_METHODS if m != "none" for k in NEXT_KEEPS for b in BATCHES}
    assert {(e["name"], e["keep"], e["batch"]) for e in entries} == expected | {("none", None, b) for b in BATCHES}
    for e in entries:
        assert e["method_timing"]["prefill_ms"]["median"] > 0 and e["oracle_timing"]["prefill_ms"]["median"] > 0
        assert e["tokens"]["visual_before"] == NEXT_TOKENS
        if e["name"] != "none":
            assert e["oracle_exact"] is True and isinstance(e["overhead_ms"], float)
            assert max(e["tokens"]["tokens_after_pruning"]) <= e["keep"] or e["name"] == "pdrop"
        # the KV cache generate() returns holds what the record says each layer saw
        assert e["method_timing"]["kv_cache_bytes"] == sum(e["kv_cache_bytes_theory_per_sample"])
    for ref in results["references"]:
        assert ref["status"] == "ok" and set(ref["short_prompt"]) == {"40", "12"}
        assert ref["tokens"]["visual_before"] == NEXT_TOKENS
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["visual_tokens_per_image"] == NEXT_TOKENS
    assert meta["image"] == {"crops": 5, "tokens": 88, "size": [112, 112], "tiles": [2, 2], "tile_tokens": [8, 8]}
    md = (out / "results.md").read_text()
    assert "- image: 112x112 image: 5 tower inputs (base view + 2x2 tiles), 88 tokens" in md
    assert "| none | all |" in md and "oracle prefill ms" in md


def test_next_flops_count_every_crop(next_run, tiny_next_model):
    """The tower and projector run on the 5 crops, the LLM on the image's 88 tokens (bench/flops.py)."""
    results, _ = next_run
    spec = tiny_next_model.spec
    for e in [*ok_entries(results), *results["references"]]:
        expected = F.prefill_flops(spec, e["layer_tokens"], crops=5)
        assert e["flops"]["true_total"] == expected["total"]
        assert e["flops"]["true_vision"] == 5 * F.vision_flops(spec)
        assert e["flops"]["true_projector"] == F.projector_flops(spec, 5 * 16)
    (none,) = [e for e in ok_entries(results) if e["name"] == "none" and e["batch"] == 1]
    assert none["layer_tokens"] == [60 + NEXT_TOKENS] * 4


def test_next_synthetic_inputs_are_what_the_processor_gives(tiny_next_model):
    model = tiny_next_model.model
    image_id = model.config.image_token_id
    inputs = synthetic_inputs(model, 2, 20, device="cpu", dtype=torch.float32)
    assert inputs.pixel_values.shape == (2, 5, 3, 56, 56) and inputs.image_sizes.tolist() == [[112, 112]] * 2
    assert inputs.visual_tokens == NEXT_TOKENS and inputs.input_ids.shape == (2, 20 + NEXT_TOKENS)
    block = inputs.input_ids[:, inputs.image_start : inputs.image_start + NEXT_TOKENS]
    assert bool((block == image_id).all()) and int((inputs.input_ids == image_id).sum()) == 2 * NEXT_TOKENS
    with torch.no_grad():  # the unmodified model's placeholder check accepts them
        assert model(**inputs.model_kwargs(), logits_to_keep=1).logits.shape[:2] == (2, 1)
    wide = synthetic_inputs(model, 1, 20, device="cpu", dtype=torch.float32, image_size=(60, 120))
    assert wide.pixel_values.shape == (1, 3, 3, 56, 56) and wide.visual_tokens == 52  # 16 + 4 x 8 + 4
    with pytest.raises(PruneConfigError, match="need the model"):
        synthetic_inputs(model.config, 1, 20, device="cpu", dtype=torch.float32)


def test_next_keep_all_and_another_image_size(tiny_next_model, tmp_path):
    cfg = BenchConfig(
        arch="tiny-next",
        methods=["random"],
        keeps=["all", 8],
        batches=[1],
        image_size=(60, 120),
        new_tokens=2,
        repeats=1,
        warmup=0,
        oracle_generate=False,
        device="cpu",
        dtype="float32",
        output=tmp_path,
        progress=False,
    )
    results = run_bench(cfg, loaded=tiny_next_model)
    assert results["config"]["keeps"] == [52, 8]
    assert [e["tokens"]["tokens_after_pruning"] for e in results["results"]] == [[52], [8]]
    assert results["meta"]["image"]["crops"] == 3 and results["meta"]["visual_tokens_per_image"] == 52


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": (0, 112)}, "--image-size must be two positive integers"),
        ({"image_size": (112,)}, "--image-size must be two positive integers"),
        ({"keeps": ["most"]}, "--keep"),
    ],
)
def test_next_bad_inputs_are_refused_before_anything_runs(kwargs, match):
    cfg = BenchConfig(arch="tiny-next", device="cpu", progress=False, **kwargs)
    with pytest.raises(PruneConfigError, match=match):
        run_bench(cfg)


def test_next_budget_above_the_image_is_refused(tiny_next_model):
    """A budget above the image's tokens is refused, not clamped: the row would name a budget never run."""
    cfg = BenchConfig(arch="tiny-next", keeps=[40, 89], device="cpu", dtype="float32", progress=False)
    with pytest.raises(PruneConfigError, match=r"\[89\] larger than the 88 visual tokens .*112x112 image"):
        run_bench(cfg, loaded=tiny_next_model)


def test_image_size_is_for_anyres_models_only(tiny_model):
    cfg = BenchConfig(arch="tiny", keeps=[16], image_size=(672, 672), device="cpu", progress=False)
    with pytest.raises(PruneConfigError, match="AnyRes"):
        run_bench(cfg, loaded=tiny_model)
    # refused before the 7 B parameters are built (building them here would not finish)
    with pytest.raises(PruneConfigError, match="resizes every image to 336x336"):
        build_model(
            model=None, arch="llava-1.5-7b", random_weights=True, device="cpu", dtype=torch.float32,
            image_size=(672, 672),
        )


def test_build_model_from_a_local_next_checkpoint(tmp_path):
    from vtprune.testing import save_tiny_llava_next

    path = save_tiny_llava_next(tmp_path / "next")
    real = build_model(model=str(path), arch=None, random_weights=False, device="cpu", dtype=torch.float32)
    rand = build_model(
        model=str(path), arch=None, random_weights=True, device="cpu", dtype=torch.float32, image_size=(100, 80)
    )
    assert type(real.model).__name__ == type(rand.model).__name__ == "LlavaNextForConditionalGeneration"
    assert (real.visual_tokens, real.image.crops) == (NEXT_TOKENS, 5)
    assert (rand.visual_tokens, rand.image.tile_tokens) == (72, (8, 6))  # 16 + 8 x 6 + 8, unpadded
    assert real.spec.anyres and not real.random_weights and rand.random_weights


def test_cli_bench_on_tiny_next(tmp_path):
    from vtprune.cli import app

    out = tmp_path / "cli-next"
    args = ["bench", "--arch", "tiny-next", "--methods", "none,vispruner", "--keep", "all,16", "--batch", "1"]
    args += ["--image-size", "100x80", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--no-oracle-generate", "--output", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["keeps"] == [72, 16] and data["meta"]["image"]["size"] == [100, 80]
    assert all(e["status"] == "ok" for e in data["results"])
    bad = CliRunner().invoke(app, ["bench", "--arch", "tiny-next", "--image-size", "wide", "--output", str(out)])
    assert bad.exit_code != 0 and "HEIGHTxWIDTH" in bad.output


def test_the_next_table_methods_run_with_their_defaults_on_a_32_layer_next():
    """The README's NeXT-7B command, in miniature: its methods with their default layers (PDrop 2/10/20,
    SparseVLM 2/6/15, FastV K=2) on random weights built like --arch llava-1.6-vicuna-7b --random-weights."""
    from vtprune.bench.workload import BenchModel, _random_model, image_of

    spec = F.ArchSpec(
        name="mini-next-32",
        hidden_size=64,
        intermediate_size=96,
        num_layers=32,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        vocab_size=300,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_layers=3,
        vision_heads=2,
        image_size=56,
        patch_size=14,
        image_token_index=260,
        pad_token_id=261,
        image_grid_pinpoints=((56, 112), (112, 56), (112, 112)),
    )
    model = _random_model(F.llava_config(spec), torch.device("cpu"), torch.float32, "sdpa", seed=0)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    loaded = BenchModel(model, spec, spec.name, True, torch.device("cpu"), torch.float32, image_of(model, spec, None))
    methods = "none,random,vispruner,visionzip,divprune,cdpruner,fastv,pdrop,sparsevlm".split(",")
    cfg = BenchConfig(
        methods=methods,
        params={"cdpruner": {"relevance": "none"}},  # no CLIP text tower offline
        keeps=[20, 5],
        batches=[2],
        new_tokens=2,
        repeats=1,
        warmup=0,
        oracle_generate=False,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    results = run_bench(cfg, loaded=loaded)
    assert all(e["status"] == "ok" for e in results["results"]), [e.get("error") for e in results["results"]]
    assert all(e["oracle_exact"] for e in results["results"] if e["name"] != "none")
    avg = {(e["name"], e["keep"]): e["tokens"]["layer_avg_tokens"][0] for e in results["results"]}
    assert avg[("fastv", 5)] == (2 * 88 + 30 * 5) / 32  # FastV keeps all 88 tokens in layers 0 and 1

def test_oracle_of_flowcut_feeds_the_same_tokens(tiny_model):
    """FlowCut prunes inside the ViT: its oracle keeps the surviving patches (full tower, no scoring)."""
    model = tiny_model.model
    inputs = synthetic_inputs(model.config, 2, 20, device="cpu", dtype=torch.float32, seed=3)
    with torch.no_grad():
        vtprune.prune(model, "flowcut", keep=12)
        model(**inputs.model_kwargs())
        record = vtprune.last_record(model)
        vtprune.prune(model, FixedSelection.from_record(record))
        model(**inputs.model_kwargs())
        replay = vtprune.last_record(model)
        vtprune.unprune(model)
    assert [s.kind for s in record.stages] == ["vit"] and [s.kind for s in replay.stages] == ["vision"]
    assert replay.stages[0].kept == record.stages[0].kept and replay.stages[0].counts == [12, 12]


# --- Qwen2-VL / Qwen2.5-VL: the tiny models of vtprune.testing, 128 x 128 image = 16 x 16 patches, 64 tokens

QWEN_METHODS = ["none", "vispruner", "fastv", "dart"]
QWEN_REFUSING = ["hiprune", "flowcut"]  # need a [CLS] row / prune inside the tower: refused on Qwen-VL
QWEN_KEEPS = [32, 16]
QWEN_TOKENS = 64


@pytest.fixture(scope="module")
def tiny_qwen_model():
    return build_model(
        model=None, arch="tiny-qwen2.5-vl", random_weights=False, device="cpu", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def qwen_cli_run(tmp_path_factory):
    """The bench command of issue 17 on the tiny Qwen2.5-VL, with two methods that refuse Qwen added."""
    from vtprune.cli import app

    out = tmp_path_factory.mktemp("bench-qwen")
    args = ["bench", "--arch", "tiny-qwen2.5-vl", "--methods", ",".join(QWEN_METHODS + QWEN_REFUSING)]
    args += ["--keep", "32,16", "--batch", "1,2", "--new-tokens", "3", "--repeats", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--output", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), out


def test_qwen_bench_runs_every_method_beside_its_oracle(qwen_cli_run):
    results, out = qwen_cli_run
    entries = results["results"]
    ran = [e for e in entries if e["name"] in QWEN_METHODS]
    assert all(e["status"] == "ok" for e in ran), [e.get("error") for e in ran]
    expected = {(m, k, b) for m in QWEN_METHODS if m != "none" for k in QWEN_KEEPS for b in BATCHES}
    expected |= {("none", None, b) for b in BATCHES}
    assert {(e["name"], e["keep"], e["batch"]) for e in ran} == expected
    for e in ran:
        assert e["method_timing"]["prefill_ms"]["median"] > 0
        assert e["oracle_timing"]["prefill_ms"]["median"] > 0
        assert e["tokens"]["visual_before"] == QWEN_TOKENS
        assert e["method_timing"]["kv_cache_bytes"] == sum(e["kv_cache_bytes_theory_per_sample"])
        if e["name"] != "none":
            assert e["oracle_exact"] is True and isinstance(e["overhead_ms"], float)
            assert e["tokens"]["tokens_after_pruning"] == [e["keep"]] * e["batch"]
    for ref in results["references"]:
        assert ref["status"] == "ok" and set(ref["short_prompt"]) == {"32", "16"}
        assert ref["vision_tower_ms"]["median"] > 0 and ref["tokens"]["visual_before"] == QWEN_TOKENS
    # the methods that refuse Qwen-VL are recorded as errors (naming the reason), the grid goes on
    refused = [e for e in entries if e["name"] in QWEN_REFUSING]
    assert len(refused) == len(QWEN_REFUSING) * len(QWEN_KEEPS) * len(BATCHES)
    assert all(e["status"] == "error" and "qwen2_5_vl" in e["error"] for e in refused)
    meta = results["meta"]
    assert meta["arch"]["family"] == "qwen2_5_vl" and meta["visual_tokens_per_image"] == QWEN_TOKENS
    assert meta["image"]["grid"] == [1, 16, 16] and meta["image"]["size"] == [128, 128]
    md = (out / "results.md").read_text()
    assert "- image: 128x128 image: 1 tower input of 16x16 patches, 64 tokens (2x2 patches merged" in md


def _tiny_qwen_vision_by_hand(family: str) -> tuple[int, int]:
    """(tower, merger) FLOPs of one 128 x 128 image on the tiny Qwen-VLs (vtprune.testing), written out: 256
    patches of 3 x 2 x 8 x 8 values, tower width 32, MLP width 64, merger 128 -> 128 -> 64 on 64 tokens."""
    n, dv = 256, 32
    patch_embed = 2 * n * (3 * 2 * 8 * 8) * dv
    if family == "qwen2_5_vl":  # 4 blocks, SwiGLU (3 matrices); 1 and 3 full, 0 and 2 in 16 windows of 16
        blocks = 4 * 2 * n * (4 * dv * dv + 3 * dv * 64) + 2 * 4 * n * n * dv + 2 * 4 * dv * (16 * 16 * 16)
    else:  # Qwen2-VL: 3 blocks, fc1 / fc2 (2 matrices, mlp_ratio 2), all full attention
        blocks = 3 * 2 * n * (4 * dv * dv + 2 * dv * 64) + 3 * 4 * n * n * dv
    merger = 2 * 64 * (128 * 128 + 128 * 64)
    return patch_embed + blocks, merger


@pytest.mark.parametrize("arch, family", [("tiny-qwen2.5-vl", "qwen2_5_vl"), ("tiny-qwen2-vl", "qwen2_vl")])
def test_qwen_flops_match_a_hand_count(arch, family):
    loaded = build_model(model=None, arch=arch, random_weights=False, device="cpu", dtype=torch.float32)
    spec = loaded.spec
    tower, merger = _tiny_qwen_vision_by_hand(family)
    assert F.vision_flops(spec) == tower and F.projector_flops(spec) == merger
    vocab = loaded.model.config.text_config.vocab_size
    n = 60 + QWEN_TOKENS  # the LLM: d 64, m 192, 4 layers, 4 heads of 16, 2 KV heads (GQA), causal attention
    per_layer = 2 * n * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192) + 2 * 64 * n * (n + 1)
    flops = F.prefill_flops(spec, n)
    assert flops["llm"] == 4 * per_layer and flops["lm_head"] == 2 * 64 * vocab
    assert flops["total"] == 4 * per_layer + 2 * 64 * vocab + tower + merger
    # another image size: the tower's cost follows the patch grid (here 8 x 16 patches, 2 x 4 windows)
    assert F.image_work(spec, (64, 128)).tokens == 32
    small = F.vision_flops(spec, image_size=(64, 128))
    assert small < tower and F.projector_flops(spec, image_size=(64, 128)) == merger // 2


def test_qwen_windows_are_the_towers_own():
    """The windows bench/flops.py counts are those of transformers' Qwen2.5-VL tower (its window index), on
    grids whose merged-token sides are not multiples of the window (partial windows at bottom and right)."""
    from vtprune import compat

    spec = F.PRESETS["qwen2.5-vl-7b"]
    for rows, cols in [(64, 64), (20, 36), (2, 58)]:
        _, cu = compat.qwen_window_index(torch.tensor([[1, rows, cols]]), 2, 112, 14)
        cu = torch.unique_consecutive(torch.as_tensor(cu))
        assert sorted((cu[1:] - cu[:-1]).tolist()) == sorted(F.qwen_window_sizes(spec, (rows, cols)))
    assert F.qwen_window_sizes(spec, (20, 36)) == [16 * 4, 16 * 4, 16 * 4, 16 * 4, 4 * 2 * 4] * 2 + [
        8 * 4, 8 * 4, 8 * 4, 8 * 4, 4 * 4
    ]
    assert F.qwen_window_sizes(F.PRESETS["qwen2-vl-7b"], (20, 36)) == [720]  # no windows: the whole image


def test_qwen_presets_are_the_released_models():
    """The presets build the checkpoints' module trees (parameter counts of Qwen/Qwen2.5-VL-7B-Instruct and
    Qwen/Qwen2-VL-7B-Instruct, on the meta device) and read back as the same ArchSpec."""
    from transformers import AutoModelForImageTextToText

    sizes = {"qwen2.5-vl-7b": 8_292_166_656, "qwen2-vl-7b": 8_291_375_616}
    for name, params in sizes.items():
        config = F.arch_config(name)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == params, name
        assert F.ArchSpec.from_config(config, name=name) == F.PRESETS[name]
        spec = F.PRESETS[name]
        assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (3584, 28, 28, 4)
        assert spec.visual_tokens == 1024 and F.image_work(spec).describe().startswith("896x896 image")
    # true prefill FLOPs of one 896 x 896 image + 60 text tokens on Qwen2.5-VL-7B: LLM, tower and merger
    flops = F.prefill_flops("qwen2.5-vl-7b", 1084)
    assert flops["vision"] == F.vision_flops("qwen2.5-vl-7b") and 5.5e12 < flops["vision"] < 5.6e12
    with pytest.raises(ValueError, match="Qwen-VL architecture"):
        F.llava_config("qwen2.5-vl-7b")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"random_weights": False}, "add --random-weights"),
        ({"image_size": (900, 896)}, r"multiples of 28 px .* got 900x896; e\.g\. 896x896"),
    ],
)
def test_qwen_preset_errors_come_before_the_7b_model_is_built(kwargs, match):
    with pytest.raises(PruneConfigError, match=match):
        build_model(**{"model": None, "arch": "qwen2.5-vl-7b", "random_weights": True, "device": "cpu",
                       "dtype": torch.float32, **kwargs})


def test_qwen_synthetic_inputs_are_what_the_processor_gives(tiny_qwen_model):
    """Layout of the processor's output for one 128 x 128 image (vision start, 64 image pads, vision end;
    flattened patches; image_grid_thw; token types), and the unmodified model reads them with its 3-D
    positions: the same logits as vtprune's keep-everything run, which takes them from get_rope_index."""
    from vtprune.testing import make_tiny_qwen_vl, random_image

    model = tiny_qwen_model.model
    cfg = model.config
    _, processor = make_tiny_qwen_vl("qwen2_5_vl")
    content = [{"type": "image"}, {"type": "text", "text": "a b"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    real = processor(text=[prompt], images=[random_image(0, 128)], return_tensors="pt")
    inputs = synthetic_inputs(model, 2, 20, device="cpu", dtype=torch.float32, image_size=(128, 128))
    assert inputs.pixel_values.shape == (2 * real["pixel_values"].shape[0], real["pixel_values"].shape[1])
    assert inputs.image_grid_thw.tolist() == real["image_grid_thw"].tolist() * 2
    pairs = [(real["input_ids"][0], real["mm_token_type_ids"][0])]
    pairs.append((inputs.input_ids[1], inputs.mm_token_type_ids[1]))
    for ids, types in pairs:
        pads = torch.nonzero(ids == cfg.image_token_id).flatten()
        assert len(pads) == QWEN_TOKENS and int(pads[-1] - pads[0]) == QWEN_TOKENS - 1
        assert int(ids[pads[0] - 1]) == cfg.vision_start_token_id
        assert int(ids[pads[-1] + 1]) == cfg.vision_end_token_id
        assert torch.equal(types, (ids == cfg.image_token_id).long())
    assert inputs.input_ids.shape == (2, 20 + QWEN_TOKENS)
    assert int(inputs.input_ids[0, inputs.image_start]) == cfg.image_token_id
    other = {cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    assert sum(int((inputs.input_ids[0] == i).sum()) for i in other) == 2  # no stray marker in the text
    with torch.no_grad():
        plain = model(**inputs.model_kwargs(), logits_to_keep=1).logits
        vtprune.prune(model, "none")
        try:
            engine = model(**inputs.model_kwargs(), logits_to_keep=1).logits
        finally:
            vtprune.unprune(model)
        text_positions = {k: v for k, v in inputs.model_kwargs().items() if k != "mm_token_type_ids"}
        wrong = model(**text_positions, logits_to_keep=1).logits
    torch.testing.assert_close(plain, engine)
    assert not torch.allclose(plain, wrong)  # without the token types the model would use text positions
    with pytest.raises(PruneConfigError, match="need the model"):
        synthetic_inputs(cfg, 1, 20, device="cpu", dtype=torch.float32)
    with pytest.raises(PruneConfigError, match="text tokens must be >= 4 on Qwen-VL"):
        synthetic_inputs(model, 1, 3, device="cpu", dtype=torch.float32, image_size=(128, 128))


def test_qwen2_vl_bench_and_another_image_size(tmp_path):
    """Qwen2-VL (a tower of full-attention blocks) through the runner, a 64 x 96 image (24 tokens = `all`)."""
    loaded = build_model(
        model=None, arch="tiny-qwen2-vl", random_weights=False, device="cpu", dtype=torch.float32
    )
    cfg = BenchConfig(
        arch="tiny-qwen2-vl", methods=["none", "vispruner", "fastv"], keeps=["all", 8], batches=[2],
        image_size=(64, 96), new_tokens=2, repeats=1, warmup=0, oracle_generate=False, device="cpu",
        dtype="float32", output=tmp_path, progress=False,
    )
    results = run_bench(cfg, loaded=loaded)
    assert all(e["status"] == "ok" for e in results["results"]), [e.get("error") for e in results["results"]]
    assert results["config"]["keeps"] == [24, 8] and list(results["meta"]["image"]["grid"]) == [1, 8, 12]
    (ref,) = results["references"]
    assert ref["status"] == "ok" and set(ref["short_prompt"]) == {"24", "8"}
    spec = loaded.spec
    for e in [*results["results"], ref]:
        expected = F.prefill_flops(spec, e["layer_tokens"], image_size=(64, 96))
        assert e["flops"]["true_total"] == expected["total"]
        assert e["flops"]["true_vision"] == F.vision_flops(spec, image_size=(64, 96))
    bad = BenchConfig(arch="tiny-qwen2-vl", keeps=[8], image_size=(60, 96), device="cpu", progress=False)
    with pytest.raises(PruneConfigError, match="multiples of 16 px"):
        run_bench(bad, loaded=loaded)


def test_build_model_from_a_local_qwen_checkpoint(tmp_path):
    """`--model` on a Qwen2.5-VL checkpoint, with its weights and with random ones (its config only)."""
    from vtprune.testing import save_tiny_qwen_vl

    path = save_tiny_qwen_vl(tmp_path / "qwen")
    for random_weights in (False, True):
        loaded = build_model(
            model=str(path), arch=None, random_weights=random_weights, device="cpu", dtype=torch.float32,
            image_size=(64, 128),
        )
        assert type(loaded.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
        assert loaded.random_weights is random_weights and loaded.spec.family == "qwen2_5_vl"
        assert loaded.visual_tokens == 32 and loaded.image.grid == (1, 8, 16)


def test_decode_per_token_is_missing_when_not_resolved():
    """(e2e - TTFT) / (N - 1) over the repeats; with too few tokens the noise of the two calls can exceed the
    decode steps (an H200 run printed -11.92 ms/token): then no figure, never a negative one."""
    from vtprune.bench.runner import decode_per_token

    summary = decode_per_token([110.0, 112.0, 130.0], ttft_ms=30.0, new_tokens=9)
    assert summary["median"] == pytest.approx(10.25) and summary["min"] == pytest.approx(10.0)
    assert summary["n"] == 3
    assert decode_per_token([95.0], ttft_ms=100.0, new_tokens=2) is None
    assert decode_per_token([], ttft_ms=100.0, new_tokens=2) is None
    # the batch-1 decode target is then printed as not measured, neither met nor missed
    results = {
        "meta": {"device_name": "NVIDIA H200", "weights_bytes": 4.8e9 * 2, "cache": "dynamic"},
        "references": [{"status": "ok", "batch": 1, "timing": {"decode_ms_per_token": None}}],
        "results": [{"status": "ok", "name": "visionzip", "method": "visionzip", "stage": "vision", "batch": 1,
                     "keep": 64, "method_timing": {"decode_ms_per_token": None}}],
    }
    checks = [c for c in target_checks(results) if c["check"].startswith("batch-1 decode")]
    assert [c["method"] for c in checks] == ["unpruned", "visionzip"]
    assert all(c["value"] is None and c["met"] is None for c in checks)


def test_batch1_targets_decode_floor_and_prefill():
    """Batch-1 checks: decode against 1.5x the weight-bandwidth floor of a known GPU, prefill speed-up >= 2."""
    from vtprune.bench.report import decode_floor_ms, target_checks

    timing = lambda decode: {"decode_ms_per_token": {"median": decode}}  # noqa: E731
    results = {
        "meta": {"device_name": "NVIDIA H200", "weights_bytes": 4.8e9 * 2, "cache": "static"},
        "references": [{"status": "ok", "batch": 1, "timing": timing(2.5)}],
        "results": [
            {"status": "ok", "name": "visionzip", "method": "visionzip", "stage": "vision", "batch": 1, "keep": 64,
             "method_timing": timing(3.5), "speedup_vs_unpruned": 2.4},
            {"status": "ok", "name": "fastv", "method": "fastv", "stage": "llm", "batch": 1, "keep": 64,
             "method_timing": timing(2.9), "speedup_vs_unpruned": 1.2},
        ],
    }
    assert decode_floor_ms(results["meta"]) == pytest.approx(2.0)
    assert decode_floor_ms({"device_name": "cpu", "weights_bytes": 1}) is None
    checks = {(c["check"].split(" (")[0], c["method"]): c for c in target_checks(results)}
    decode = "batch-1 decode <= 1.5 x bandwidth floor"
    assert checks[(decode, "unpruned")]["met"] and checks[(decode, "fastv")]["met"]
    assert not checks[(decode, "visionzip")]["met"]  # 3.5 > 1.5 x 2.0
    assert "static cache" in next(c["check"] for c in target_checks(results) if c["check"].startswith(decode))
    prefill = "batch-1 prefill speed-up vs unpruned"
    assert checks[(prefill, "visionzip")]["met"] and not checks[(prefill, "fastv")]["met"]


def test_profile_explains_a_missed_decode_target(tiny_model, tmp_path, monkeypatch):
    """`--profile`: a missed batch-1 decode target gets a decode profile (per token: wall and, on a GPU,
    GPU-busy time) of the unpruned model and of the method that missed, in profile.txt and results.md."""
    from vtprune.bench import report

    # every decode misses it (even a negative one: a difference of two timed calls on a loaded CPU)
    monkeypatch.setattr(report, "decode_floor_ms", lambda meta: -1e9)
    results, out = _cpu_run(tiny_model, tmp_path / "b", methods=["none", "fastv"], keeps=[16], batches=[1],
                            repeats=1, warmup=0, profile=True)
    missed = [c for c in results["targets"] if c["check"].startswith("batch-1 decode")]
    assert missed and all(c["met"] is False for c in missed)
    decodes = [p for p in results["profiles"] if "decode_wall_ms_per_token" in p]
    assert [p["label"] for p in decodes] == ["B=1 unpruned", "B=1 fastv keep=16"]
    # a difference of two timed calls: finite (its sign is noise for a tiny CPU model); no GPU, no busy time
    assert all(math.isfinite(p["decode_wall_ms_per_token"]) for p in decodes)
    assert all(p["decode_gpu_busy_ms_per_token"] is None for p in decodes)
    # every method that missed a target also gets a prefill profile, with its oracle's beside it
    prefills = [p["label"] for p in results["profiles"] if "wall_ms" in p]
    assert prefills == ["B=1 unpruned", "B=1 fastv keep=16", "B=1 oracle of fastv keep=16"]
    assert "decode per token" in (out / "profile.txt").read_text()
    assert "## Profiled decode steps" in (out / "results.md").read_text()
