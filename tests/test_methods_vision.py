"""Hand-computed and end-to-end tests of the vision-stage methods: CDPruner, DivPrune, VisionZip,
VisPruner's seed options (sink exclusion, parameter aliases). The invariant matrix is in test_engine.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTIONS, build_inputs
from transformers import CLIPConfig, CLIPModel

import vtprune
from vtprune.methods.base import ModelInfo, PruneConfigError, Stage
from vtprune.methods.cdpruner import clean_question, clip_text_embeddings, load_clip_parts
from vtprune.testing import BASIC_WORDS, build_clip_word_tokenizer

INFO_576 = ModelInfo(num_layers=32, num_heads=32, visual_tokens=576, grid=(24, 24), vision_layers=24, vision_heads=16)
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
TINY_POPE_SUFFIX = "\nanswer the question using a single word or phrase ."  # in the tiny LLaVA vocabulary


def _stage(keep: int) -> Stage:
    return Stage(kind="vision", keep=keep)


class _Projected:
    """Fake VisionSignals holding only what the diversity selectors read."""

    def __init__(self, projected, features=None):
        self.projected = projected
        self.features = projected if features is None else features


def _unit(degrees):
    rad = torch.tensor([math.radians(a) for a in degrees])
    return torch.stack([rad.cos(), rad.sin()], dim=-1)


# --- CDPruner: hand-computed DPP --------------------------------------------------------------------------


def _ex4_signals():
    # cos(x0, x1) = .9, x2 ⟂ both, x3 ⟂ everything (it carries the minimum relevance so ρ̃ hits [1, .9, .5])
    x = torch.zeros(1, 4, 4)
    x[0, 0, 0] = 1.0
    x[0, 1, 0], x[0, 1, 1] = 0.9, math.sqrt(1 - 0.81)
    x[0, 2, 2] = 1.0
    x[0, 3, 3] = 1.0
    return _Projected(x)


def _cdpruner_with_relevance(rho, **params):
    method = vtprune.get_method("cdpruner", **params)
    method.relevance_scores = lambda signals: rho  # the CLIP part is tested end to end below
    return method


def test_cdpruner_hand_computed_example():
    """S = [[1,.9,0],[.9,1,0],[0,0,1]], ρ̃ = [1,.9,.5]: pick 0 (d²=1), then d² = [-, .1539, .25] → 2."""
    method = _cdpruner_with_relevance(torch.tensor([[1.0, 0.9, 0.5, 0.0]]), keep=2)
    sel = method.select(0, _stage(2), _ex4_signals())
    assert sel.indices.tolist() == [[0, 2]]  # the relevant but redundant token 1 loses
    torch.testing.assert_close(sel.scores[0, :3], torch.tensor([1.0, 0.9, 0.5]), atol=1e-5, rtol=0)
    # a less relevant token 2 (ρ̃ = .2, L22 = .04 < .1539) gives way to token 1
    method = _cdpruner_with_relevance(torch.tensor([[1.0, 0.9, 0.2, 0.0]]), keep=2)
    assert method.select(0, _stage(2), _ex4_signals()).indices.tolist() == [[0, 1]]


def test_cdpruner_relevance_none_is_plain_dpp():
    method = vtprune.get_method("cdpruner", keep=2, relevance="none")
    sel = method.select(0, _stage(2), _ex4_signals())
    assert sel.indices.tolist() == [[0, 2]]  # first pick: exact tie d² = 1 → lowest index; then most orthogonal
    assert sel.scores is None


def test_cdpruner_relevance_normalised_per_sample():
    """Min–max of ρ is taken per image row: a batch selects exactly what each sample selects alone."""
    g = torch.Generator().manual_seed(0)
    projected = torch.randn(3, 40, 16, generator=g)
    rho = torch.randn(3, 40, generator=g)
    rho[1] = rho[1] * 100 + 50  # very different ranges: a batch-wide min–max would flatten sample 0
    rho[2] = rho[2] * 1e-3 - 7
    batched = _cdpruner_with_relevance(rho, keep=9).select(0, _stage(9), _Projected(projected))
    for i in range(3):
        alone = _cdpruner_with_relevance(rho[i : i + 1], keep=9).select(0, _stage(9), _Projected(projected[i : i + 1]))
        assert alone.indices.tolist() == batched.indices[i : i + 1].tolist()
        torch.testing.assert_close(alone.scores, batched.scores[i : i + 1])
    # ρ̃ = (ρ − min + 1e-6) / (max − min) spans [~0, ~1] in every row
    assert torch.allclose(batched.scores.amax(dim=1), torch.ones(3), atol=1e-3)
    assert bool((batched.scores.amin(dim=1) < 1e-2).all())


def test_clean_question():
    assert clean_question("is there a cat ?" + POPE_SUFFIX + " ASSISTANT:") == "is there a cat ?"
    mcq = "Which one?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    assert clean_question(mcq + " ASSISTANT:") == "Which one?\nA. x\nB. y"
    # decoded word by word (spaces around punctuation) still matches
    assert clean_question("how many ? Answer the question using a single word or phrase . ASSISTANT :") == "how many ?"
    assert clean_question("what is the model") == "what is the model"


# --- CDPruner with a tiny CLIP saved to disk ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP (vision width 32 = the tiny LLaVA's tower) + a word-level tokenizer, saved with save_pretrained."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_clip_word_tokenizer([*BASIC_WORDS, "'", "s"])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():  # a wider spread than the default init, so relevance varies between patches
        model.visual_projection.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def llava_tokenizer_dir(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_tokenizer")
    tiny[2].tokenizer.save_pretrained(directory)
    return str(directory)


def _spy_cdpruner(monkeypatch):
    """Record the relevance and the question texts CDPruner computes while the model runs."""
    from vtprune.methods.cdpruner import CDPruner

    seen: dict = {}
    original_relevance, original_questions = CDPruner.relevance_scores, CDPruner.questions

    def relevance(self, signals):
        out = original_relevance(self, signals)
        seen["rho"], seen["signals"] = out, signals
        return out

    def questions(self, signals):
        seen["questions"] = original_questions(self, signals)
        return seen["questions"]

    monkeypatch.setattr(CDPruner, "relevance_scores", relevance)
    monkeypatch.setattr(CDPruner, "questions", questions)
    return seen


def test_cdpruner_clip_relevance_matches_reference(tiny, tiny_clip_dir, llava_tokenizer_dir, monkeypatch):
    model, _, processor = tiny
    questions = [QUESTIONS[0] + TINY_POPE_SUFFIX, QUESTIONS[1], QUESTIONS[0]]  # a repeated question is encoded once
    inputs = build_inputs(processor, questions, [1, 2, 3])
    seen = _spy_cdpruner(monkeypatch)
    with vtprune.pruned(model, "cdpruner", keep=12, clip_model=tiny_clip_dir, prompt_tokenizer=llava_tokenizer_dir):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_record(model).stages[0].kept
    assert seen["questions"] == [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0]]  # suffix and "ASSISTANT:" stripped
    assert [len(k) for k in kept] == [12, 12, 12]

    # reference: the CLIP model itself, pooled at EOS, against the LLaVA tower's post-layernorm features
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    from transformers import AutoTokenizer

    clip_tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    signals = seen["signals"]
    tower = model.model.vision_tower
    with torch.no_grad():
        image = clip.visual_projection(tower.post_layernorm(signals.features))
        expected = []
        for i, q in enumerate(seen["questions"]):
            ids = [clip_tok.bos_token_id, *clip_tok(q, add_special_tokens=False)["input_ids"], clip_tok.eos_token_id]
            text = clip.get_text_features(input_ids=torch.tensor([ids])).pooler_output
            expected.append(-F.cosine_similarity(image[i], text, dim=-1))
    torch.testing.assert_close(seen["rho"], torch.stack(expected), rtol=1e-4, atol=1e-5)


def test_cdpruner_clip_batched_equals_single(tiny, batch_inputs, tiny_clip_dir, llava_tokenizer_dir):
    model, _, processor = tiny
    params = {"clip_model": tiny_clip_dir, "prompt_tokenizer": llava_tokenizer_dir}
    with vtprune.pruned(model, "cdpruner", keep=10, **params):
        with torch.no_grad():
            model(**batch_inputs)
        batched = vtprune.last_record(model).stages[0].kept
        for i, seed in enumerate([1, 2, 3]):
            with torch.no_grad():
                model(**build_inputs(processor, [QUESTIONS[i]], [seed]))
            assert vtprune.last_record(model).stages[0].kept[0] == batched[i]
    with vtprune.pruned(model, "cdpruner", keep=10, relevance="none"):
        with torch.no_grad():
            model(**batch_inputs)
        plain = vtprune.last_record(model).stages[0].kept
    assert plain != batched  # the text relevance changes the selection


def test_cdpruner_prompt_tokenizer_sources(tiny, tiny_clip_dir, llava_tokenizer_dir, monkeypatch):
    model, _, processor = tiny
    inputs = build_inputs(processor, [QUESTIONS[2]], [3])
    seen = _spy_cdpruner(monkeypatch)
    # a tokenizer object (recorded by name, so the record stays JSON-friendly)
    with vtprune.pruned(model, "cdpruner", keep=8, clip_model=tiny_clip_dir, prompt_tokenizer=processor.tokenizer):
        with torch.no_grad():
            model(**inputs)
        assert isinstance(vtprune.last_record(model).params["prompt_tokenizer"], str)
    assert seen.pop("questions") == [QUESTIONS[2]]
    # the checkpoint the model was loaded from
    previous = model.config._name_or_path
    model.config._name_or_path = llava_tokenizer_dir
    try:
        with vtprune.pruned(model, "cdpruner", keep=8, clip_model=tiny_clip_dir):
            with torch.no_grad():
                model(**inputs)
    finally:
        model.config._name_or_path = previous
    assert seen.pop("questions") == [QUESTIONS[2]]


def test_cdpruner_long_question_is_chunked(tiny_clip_dir):
    parts, tokenizer = load_clip_parts(tiny_clip_dir, "cpu", torch.float32)
    words = ("is there a red circle in the image " * 25).split()  # 200 tokens → 3 segments of ≤ 75
    texts = [" ".join(words), "how many"]
    emb, valid = clip_text_embeddings(parts, tokenizer, texts)
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    for s, piece in enumerate([words[:75], words[75:150], words[150:]]):
        alone, _ = clip_text_embeddings(parts, tokenizer, [" ".join(piece)])
        torch.testing.assert_close(emb[0, s], alone[0, 0], rtol=1e-4, atol=1e-5)


def test_cdpruner_missing_clip_is_a_clear_error(tiny, batch_inputs, tmp_path, llava_tokenizer_dir):
    model, _, _ = tiny
    for missing in (str(tmp_path / "no_such_clip"), str(tmp_path)):  # absent folder; folder without weights
        with vtprune.pruned(model, "cdpruner", keep=8, clip_model=missing, prompt_tokenizer=llava_tokenizer_dir):
            with pytest.raises(PruneConfigError, match="clip_model"):
                with torch.no_grad():
                    model(**batch_inputs)
    assert not vtprune.is_pruned(model)


def test_cdpruner_needs_a_prompt_tokenizer(tiny, batch_inputs, tiny_clip_dir):
    model, _, _ = tiny
    assert not model.config._name_or_path  # built in memory
    with vtprune.pruned(model, "cdpruner", keep=8, clip_model=tiny_clip_dir):
        with pytest.raises(PruneConfigError, match="prompt_tokenizer"):
            with torch.no_grad():
                model(**batch_inputs)
    with pytest.raises(PruneConfigError, match="relevance"):
        vtprune.get_method("cdpruner", relevance="text")


# --- DivPrune: hand-computed max–min diversity ------------------------------------------------------------


def test_divprune_hand_computed_example():
    """Unit vectors at 0°, 10°, 90°, 180°: first pick 3 (nearest-other distance 1.0), then 0 (distance 2)."""
    signals = _Projected(_unit([0, 10, 90, 180])[None])
    assert vtprune.get_method("divprune", keep=1).select(0, _stage(1), signals).indices.tolist() == [[3]]
    assert vtprune.get_method("divprune", keep=2).select(0, _stage(2), signals).indices.tolist() == [[0, 3]]
    assert vtprune.get_method("divprune", keep=3).select(0, _stage(3), signals).indices.tolist() == [[0, 2, 3]]


def test_divprune_feature_choice_and_batch():
    g = torch.Generator().manual_seed(1)
    projected, features = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 5, generator=g)
    signals = _Projected(projected, features)
    a = vtprune.get_method("divprune", keep=7).select(0, _stage(7), signals)
    b = vtprune.get_method("divprune", keep=7, feature="vision").select(0, _stage(7), signals)
    assert a.indices.tolist() != b.indices.tolist()
    for i in range(2):
        alone = vtprune.get_method("divprune", keep=7).select(0, _stage(7), _Projected(projected[i : i + 1]))
        assert alone.indices.tolist() == a.indices[i : i + 1].tolist()
        assert alone.indices[0].tolist() == sorted(alone.indices[0].tolist())
    with pytest.raises(PruneConfigError, match="feature"):
        vtprune.get_method("divprune", feature="keys")


# --- VisionZip ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (100, (84, 16)), (1, (1, 0))])
def test_visionzip_budget_split(keep, split):
    method = vtprune.get_method("visionzip", keep=keep)
    assert method.split(INFO_576) == split
    assert method.stages(INFO_576)[0].keep == keep


def test_visionzip_explicit_split():
    assert vtprune.get_method("visionzip", dominant=54, contextual=10).stages(INFO_576)[0].keep == 64
    assert vtprune.get_method("visionzip", keep=64, dominant=60).split(INFO_576) == (60, 4)
    assert vtprune.get_method("visionzip", keep=64, contextual=4).split(INFO_576) == (60, 4)
    with pytest.raises(PruneConfigError, match="conflicts"):
        vtprune.get_method("visionzip", keep=32, dominant=54, contextual=10).validate_for(INFO_576)
    with pytest.raises(PruneConfigError, match="split"):
        vtprune.get_method("visionzip", keep=8, contextual=8).validate_for(INFO_576)
    with pytest.raises(PruneConfigError, match="dominant"):
        vtprune.get_method("visionzip", dominant=0)


def _visionzip_reference(model, pixel_values, d, c):
    """VisionZip from its definition, with an eager tower's attention probabilities and plain loops."""
    cfg = model.config
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        layer_index = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1) - 1
        hidden = out.hidden_states[layer_index + 1]  # (N, 1 + P, Dv) the feature layer's output
        cls_attn = out.attentions[layer_index][:, :, 0, 1:].sum(dim=1)  # summed over heads
        layer = tower.encoder.layers[layer_index]
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[layer_index]))
        heads = cfg.vision_config.num_attention_heads
        keys = keys.view(*keys.shape[:2], heads, -1).mean(dim=2)
        projector = model.model.multi_modal_projector
        rows, kept = [], []
        for i in range(hidden.shape[0]):
            top = sorted((torch.argsort(cls_attn[i], descending=True)[: d - 1] + 1).tolist())
            rest = [j for j in range(hidden.shape[1]) if j != 0 and j not in top]
            step = max(1, len(rest) // c) if c else 1
            targets = rest[::step][:c]
            knorm = F.normalize(keys[i], dim=-1)
            members = {t: [] for t in targets}
            for j in rest:
                if j in members:
                    continue
                sims = torch.stack([knorm[j] @ knorm[t] for t in targets])
                members[targets[int(sims.argmax())]].append(j)
            ctx = [hidden[i, t] + (hidden[i, members[t]].mean(0) if members[t] else 0) for t in targets]
            tokens = torch.stack([hidden[i, 0], *[hidden[i, j] for j in top], *ctx])
            rows.append(projector(tokens))
            kept.append([-1, *[j - 1 for j in top], *[-1] * c])
    return rows, kept


def test_visionzip_sequence_layout_and_created_tokens_reach_llm(tiny, batch_inputs):
    model, _, _ = tiny
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtprune.pruned(model, "visionzip", keep=16):  # D = 14 ([CLS] + 13 patches), C = 2
            with torch.no_grad():
                model(**batch_inputs)
            record = vtprune.last_record(model)
    finally:
        handle.remove()
    rows, kept = _visionzip_reference(model, batch_inputs["pixel_values"], 14, 2)
    assert record.stages[0].kept == kept
    assert record.stages[0].counts == [16, 16, 16]
    assert record.stages[0].extra == {"dominant": 14, "contextual": 2}
    image_token = model.config.image_token_id
    for b in range(3):
        start = int((batch_inputs["input_ids"][b] == image_token).nonzero()[0])  # text before the image is unchanged
        llm_rows = captured["hidden"][b, start : start + 16]
        torch.testing.assert_close(llm_rows, rows[b], rtol=1e-4, atol=1e-5)
        # dominant patches are the model's own projected features
        assert not torch.allclose(llm_rows[0], llm_rows[1])


def test_visionzip_contextual_only_budget(tiny, batch_inputs):
    """dominant=1 keeps only [CLS] plus contextual tokens; every patch index is created (-1)."""
    model, _, _ = tiny
    with vtprune.pruned(model, "visionzip", keep=6, dominant=1):
        with torch.no_grad():
            out = model.generate(**batch_inputs, max_new_tokens=2, do_sample=False)
        record = vtprune.last_record(model)
    assert record.stages[0].kept == [[-1] * 6] * 3
    assert out.shape[1] == batch_inputs["input_ids"].shape[1] + 2


def test_visionzip_full_budget_is_the_unmodified_model(tiny, batch_inputs):
    """Issue 20 point 4. dvlab-research/VisionZip `visionzip/clip_encoder.py` @ 3151f6d has no special
    case: with D + C = every token it still feeds [CLS] in place of a patch, puts the C non-dominant
    patches after the dominant ones as contextual targets and adds the leftover patch to its most similar
    target. vtprune feeds the unmodified image; one token less is the real method again."""
    model, _, _ = tiny
    with torch.no_grad():
        reference = model(**batch_inputs).logits
    valid = batch_inputs["attention_mask"].bool()
    for params in ({"keep": 64}, {"keep": 1.0}, {"dominant": 60, "contextual": 4}, {"keep": 64, "contextual": 3}):
        with vtprune.pruned(model, "visionzip", **params):
            with torch.no_grad():
                logits = model(**batch_inputs).logits
            stage = vtprune.last_record(model).stages[0]
        torch.testing.assert_close(logits[valid], reference[valid], rtol=1e-5, atol=1e-5)
        assert stage.kept == [list(range(64))] * 3 and stage.extra["unchanged"] is True, params
    with vtprune.pruned(model, "visionzip", keep=63):
        with torch.no_grad():
            logits = model(**batch_inputs).logits
        assert vtprune.last_record(model).stages[0].kept[0][0] == -1  # [CLS] first, then merges
    assert not torch.allclose(logits[:, -1], reference[:, -1], atol=1e-3)


def test_illava_full_budget_skips_the_default_vit_stage():
    """Issue 20 point 4: iLLaVA's default ViT stage (hulianyuyy/iLLaVA @ 4068149: layers 5-8, 92 patches
    each) would merge 368 of LLaVA-1.5's 576 patches even at keep = 576; a full budget is the unmodified
    model. Explicit vit_layers fix their own count and still run."""
    full = vtprune.get_method("illava", keep=576).stages(INFO_576)
    assert [(s.kind, s.keep) for s in full] == [("llm", 576)]
    assert [s.kind for s in vtprune.get_method("illava", keep=1.0).stages(INFO_576)] == ["llm"]
    assert [(s.kind, s.keep) for s in vtprune.get_method("illava", keep=300).stages(INFO_576)] == [
        ("vit", 208),
        ("llm", 208),
    ]
    explicit = vtprune.get_method("illava", keep=576, vit_layers=(5, 6)).stages(INFO_576)
    assert [(s.kind, s.keep) for s in explicit] == [("vit", 392), ("llm", 392)]


# --- VisPruner: sink exclusion and the seed's parameter names ---------------------------------------------


class _ClsSignals:
    def __init__(self, cls_attention, features):
        self.cls_attention = cls_attention
        self.features = features


def test_vispruner_nosink_never_selects_sinks():
    g = torch.Generator().manual_seed(2)
    p = 64
    attention = torch.rand(2, p, generator=g) * 0.01  # ordinary patches below the 0.02 threshold
    sinks = {0: [5, 17, 40], 1: [0, 63]}
    for row, idx in sinks.items():
        attention[row, idx] = torch.tensor([0.2, 0.05, 0.021][: len(idx)])  # the highest attention of the row
    signals = _ClsSignals(attention, torch.randn(2, p, 8, generator=g))
    plain = vtprune.get_method("vispruner", keep=16).select(0, _stage(16), signals)
    nosink = vtprune.get_method("vispruner_nosink", keep=16).select(0, _stage(16), signals)
    for row, idx in sinks.items():
        assert set(idx) <= set(plain.indices[row].tolist())  # plain VisPruner takes them first
        assert not set(idx) & set(nosink.indices[row].tolist())
        assert len(set(nosink.indices[row].tolist())) == 16
    assert list(nosink.info) == ["sinks"] and nosink.info["sinks"].tolist() == [3, 2]  # read with the record
    assert vtprune.get_method("vispruner_nosink").attention_sink_threshold == 0.02
    # a threshold that marks everything but 10 patches leaves fewer candidates than the budget: padding slots
    few = vtprune.get_method("vispruner_nosink", keep=16, attention_sink_threshold=0.0095)
    sel = few.select(0, _stage(16), _ClsSignals(torch.full((1, p), 0.01).index_fill(1, torch.arange(10), 0.001), torch.randn(1, p, 8, generator=g)))
    assert sel.valid.sum().item() == 10 and sel.indices[sel.valid].tolist() == list(range(10))


def test_vispruner_nosink_in_model_excludes_sinks(tiny, batch_inputs):
    model, _, _ = tiny
    from vtprune.methods.vispruner import VisPruner

    seen = {}
    original = VisPruner.select

    def spy(self, i, stage, signals):
        seen["cls"] = signals.cls_attention
        return original(self, i, stage, signals)

    VisPruner.select = spy
    try:
        with vtprune.pruned(model, "vispruner", keep=16):
            with torch.no_grad():
                model(**batch_inputs)
        threshold = float(seen["cls"].quantile(0.9))  # the top 10% of patches are "sinks"
        with vtprune.pruned(model, "vispruner_nosink", keep=16, attention_sink_threshold=threshold):
            with torch.no_grad():
                model(**batch_inputs)
            record = vtprune.last_record(model)
    finally:
        VisPruner.select = original
    sinks = seen["cls"] > threshold
    assert bool(sinks.any(dim=1).all())
    for b, kept in enumerate(record.stages[0].kept):
        assert not any(bool(sinks[b, k]) for k in kept)
    assert record.stages[0].extra["sinks"] == sinks.sum(dim=1).tolist()


def test_vispruner_seed_parameter_aliases():
    m = vtprune.get_method("vispruner_nosink", retain_img_tokens=128, vispruner_ratio=0.75, removal_number=4)
    assert (m.keep, m.important_ratio, m.removal_number) == (128, 0.75, 4)
    assert m.params()["retain_img_tokens"] is None and m.params()["vispruner_ratio"] is None
    assert m.stages(INFO_576)[0].keep == 128
    again = vtprune.get_method(m, keep=64)  # replace() on a built method keeps working
    assert (again.keep, again.important_ratio) == (64, 0.75)
    assert vtprune.get_method("vispruner", keep=64, retain_img_tokens=64).keep == 64
    with pytest.raises(PruneConfigError, match="retain_img_tokens"):
        vtprune.get_method("vispruner", keep=64, retain_img_tokens=32)
    with pytest.raises(PruneConfigError, match="vispruner_ratio"):
        vtprune.get_method("vispruner", important_ratio=0.25, vispruner_ratio=0.75)
    with pytest.raises(PruneConfigError, match="important_ratio"):
        vtprune.get_method("vispruner", vispruner_ratio=1.5)


@pytest.mark.parametrize("keep", [64, 128, 192, 100])
def test_vision_budgets_are_exact(keep):
    """Vision-stage methods feed exactly `keep` tokens per image; VisPruner uses r = 0.5 at every budget."""
    for name in ("vispruner", "vispruner_nosink", "cdpruner", "divprune", "visionzip"):
        assert vtprune.get_method(name, keep=keep).stages(INFO_576)[0].keep == keep
    assert vtprune.get_method("vispruner", keep=keep).important_ratio == 0.5
    assert vtprune.get_method("cdpruner").stages(INFO_576)[0].keep == 64


# --- PruMerge / PruMerge+ (docs/methods/prumerge.md) --------------------------------------------------------


def _prumerge_reference(attn, x, keys, plus, neighbours=32, start_div=None):
    """The official per-image loops (one image): IQR outliers, spatial samples, top-k key-cosine merge.

    Spatial samples: `arange(0, 575, int(s/3))` in 42Shawn/LLaVA-PruMerge `clip_encoder.py` @ 097c041
    (start_div=None), `arange(int(s/6), 575, int(s/3))` @ 9d6586e (start_div=6).
    """
    import numpy as np

    p = attn.shape[0]
    q1, q3 = np.percentile(attn.numpy(), 25), np.percentile(attn.numpy(), 75)
    n_out = max(1, int((attn.numpy() > q3 + 1.5 * (q3 - q1)).sum()))
    idx = sorted(range(p), key=lambda j: (-float(attn[j]), j))[:n_out]
    if plus:
        step = p // n_out
        start = 0 if start_div is None else step // start_div
        idx += [j for j in range(start, p - 1, max(1, step // 3)) if j not in idx]
    kn = F.normalize(keys, dim=-1)
    merged = []
    for i in idx:
        others = [j for j in range(p) if j != i]
        sims = torch.stack([kn[i] @ kn[j] for j in others])
        near = [others[j] for j in sorted(range(len(others)), key=lambda j: (-float(sims[j]), j))[:neighbours]]
        merged.append(x[i] + sum(attn[j] * x[j] for j in near))
    pruned = [j for j in range(p) if j not in idx]
    extra = sum(attn[j] * x[j] for j in pruned)
    return idx, torch.stack(merged), extra


def _prumerge_inputs(seed, p=64, d=6, outliers=(2, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(len(outliers), p, generator=g) * 0.01
    for row, n_out in enumerate(outliers):  # n_out clear outliers, at distinct random places
        places = torch.randperm(p, generator=g)[:n_out]
        attn[row, places] = 0.05 + 0.1 * torch.rand(n_out, generator=g)
    attn = attn / attn.sum(dim=1, keepdim=True)
    return attn, torch.randn(len(outliers), p, d, generator=g), torch.randn(len(outliers), p, 5, generator=g)


@pytest.mark.parametrize(("plus", "rule"), [(False, "main"), (True, "main"), (True, "9d6586e")])
def test_prumerge_matches_official_loops(plus, rule):
    from vtprune.methods.prumerge import outlier_count, prumerge_select

    attn, x, keys = _prumerge_inputs(0)
    assert outlier_count(attn).tolist() == [2, 5, 1]
    indices, valid, merged, extra = prumerge_select(attn, x, keys, plus=plus, spatial_rule=rule)
    counts = valid.sum(dim=1).tolist()
    start_div = 6 if rule == "9d6586e" else None
    for row in range(3):
        idx, ref_merged, ref_extra = _prumerge_reference(attn[row], x[row], keys[row], plus, start_div=start_div)
        assert indices[row, : counts[row]].tolist() == idx  # attention rank order, then spatial samples
        torch.testing.assert_close(merged[row, : counts[row]], ref_merged, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(extra[row, 0], ref_extra, rtol=1e-5, atol=1e-6)
    assert len(set(counts)) == 3 and not bool(valid.all())  # adaptive counts, padded
    # each image alone selects the same
    for row in range(3):
        alone = prumerge_select(
            attn[row : row + 1], x[row : row + 1], keys[row : row + 1], plus=plus, spatial_rule=rule
        )
        assert alone[0][0].tolist() == indices[row, : counts[row]].tolist()


def test_prumerge_plus_spatial_sequence_576():
    """PruMerge+ on 576 tokens, s = int(1 / ratio) = int(576 / count). The current official rule,
    42Shawn/LLaVA-PruMerge `llava/model/multimodal_encoder/clip_encoder.py` @ 097c041 (main, unchanged since
    1ca8b2b): `arange(0, 575, int(s/3))` minus the attention-kept tokens. The first PruMerge+ commit 9d6586e
    started at int(s/6) (`spatial_rule="9d6586e"`; vtprune's default before issue 20)."""
    from vtprune.methods.prumerge import prumerge_select

    attn = torch.full((1, 576), 1e-3)
    attn[0, [64, 300, 301]] = torch.tensor([0.7, 0.5, 0.6])  # 3 outliers → s = 192, stride 64; 64 is also a sample
    x, keys = torch.randn(1, 576, 4), torch.randn(1, 576, 4)
    indices, valid, _, _ = prumerge_select(attn, x, keys, plus=True)
    assert indices[0].tolist() == [64, 301, 300, 0, 128, 192, 256, 320, 384, 448, 512] and bool(valid.all())
    capped = prumerge_select(attn, x, keys, plus=True, cap=5)
    assert capped[0][0].tolist() == [64, 301, 300, 0, 128]
    old = prumerge_select(attn, x, keys, plus=True, spatial_rule="9d6586e")[0]
    assert old[0].tolist() == [64, 301, 300, *range(32, 575, 64)]  # 32, 96, ..., 544: nothing coincides


def test_prumerge_spatial_rule_option(tiny, batch_inputs):
    from vtprune.methods.prumerge import SPATIAL_RULES

    assert vtprune.get_method("prumerge", plus=True).spatial_rule == "main"
    assert SPATIAL_RULES["main"].commit == "097c041" and SPATIAL_RULES["9d6586e"].start_div == 6
    with pytest.raises(PruneConfigError, match="spatial_rule"):
        vtprune.get_method("prumerge", plus=True, spatial_rule="old")
    model, _, _ = tiny
    with vtprune.pruned(model, "prumerge", plus=True, spatial_rule="9d6586e"):
        with torch.no_grad():
            model(**batch_inputs)


def test_prumerge_in_model(tiny, batch_inputs, monkeypatch):
    """Adaptive counts that differ per image: batched == single, created extra token last, caps honoured."""
    import vtprune.methods.prumerge as prumerge

    model, _, processor = tiny
    # make the counts image-dependent (the tiny tower gives one outlier everywhere): 1 + argmax % 4
    monkeypatch.setattr(prumerge, "outlier_count", lambda attn: 1 + attn.argmax(dim=1) % 4)
    with vtprune.pruned(model, "prumerge", plus=True):
        with torch.no_grad():
            batched = model(**batch_inputs).logits[:, -1]
        record = vtprune.last_record(model)
        kept = record.stages[0].kept
        assert len(set(record.stages[0].counts)) > 1
        for i, seed in enumerate([1, 2, 3]):
            with torch.no_grad():
                single = model(**build_inputs(processor, [QUESTIONS[i]], [seed])).logits[:, -1]
            torch.testing.assert_close(single[0], batched[i], rtol=1e-4, atol=1e-4)
            assert vtprune.last_record(model).stages[0].kept[0] == kept[i]
    assert all(k[-1] == -1 and -1 not in k[:-1] for k in kept)  # the extra token closes each image
    with vtprune.pruned(model, "prumerge", keep=3, plus=True):
        with torch.no_grad():
            model(**batch_inputs)
        assert max(vtprune.last_record(model).stages[0].counts) <= 3
    with pytest.raises(PruneConfigError, match="keep"):
        vtprune.prune(model, "prumerge", keep=1)
    assert not vtprune.is_pruned(model)


# --- SCOPE: greedy saliency × coverage ---------------------------------------------------------------------


def test_scope_hand_example():
    """Tokens at 0°, 10°, 90°, 180°; saliency [.1, .2, .4, .3]. Step 1 gains Σ_i max(0, S_ij):
    [1.985, 2.159, 1.174, 1] → scores [.199, .432, .470, .300] → token 2; coverage c = S[2] floored at 0 =
    [0, .174, 1, 0]. Step 2 gains: token 0 1 + (.985 − .174) = 1.811, token 1 .985 + (1 − .174) = 1.811,
    token 3 1 → scores [.181, .362, −, .300] → token 1. Saliency alone would keep {2, 3}; coverage alone
    (α = 0) keeps 1 (2.159), then 3 (gain 1 > .826 for token 2)."""
    from vtprune.methods.scope import scope_select

    x = _unit([0, 10, 90, 180])[None]
    a = torch.tensor([[0.1, 0.2, 0.4, 0.3]])
    assert scope_select(x, a, 2).indices.tolist() == [[1, 2]]
    assert scope_select(x, a, 2, alpha=0.0).indices.tolist() == [[1, 3]]
    # combine="add": step 1 scores [2.085, 2.359, 1.574, 1.3] → 1; step 2 gains [.015, .826, 1] + a → 3
    assert scope_select(x, a, 2, combine="add").indices.tolist() == [[1, 3]]
    method = vtprune.get_method("scope", keep=2)
    sel = method.select(0, _stage(2), _ScopeSignals(x, a))
    assert sel.indices.tolist() == [[1, 2]]


class _ScopeSignals:
    def __init__(self, features, saliency, heads=2):
        self.features = features
        self.cls_attention_heads = saliency[:, None, :].expand(-1, heads, -1) / heads  # sums back to saliency


def _scope_reference(x, a, k, alpha=1.0, combine="multi"):
    """The official greedy loop on one image, written plainly."""
    n = x.shape[0]
    sim = F.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1)
    covered = [0.0] * n
    selected = []
    for _ in range(k):
        best, best_score = None, None
        for j in range(n):
            if j in selected:
                continue
            gain = sum(max(0.0, float(sim[i, j]) - covered[i]) for i in range(n))
            w = float(a[j]) ** alpha
            score = gain * w if combine == "multi" else gain + w
            if best_score is None or score > best_score:
                best, best_score = j, score
        selected.append(best)
        covered = [max(covered[i], float(sim[i, best])) for i in range(n)]
    return sorted(selected)


@pytest.mark.parametrize("seed", range(3))
def test_scope_matches_plain_reference_on_random_inputs(seed):
    from vtprune.methods.scope import scope_select

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 30, 6, generator=g, dtype=torch.float64).float()
    a = torch.rand(2, 30, generator=g)
    for k, alpha, combine in [(8, 1.0, "multi"), (5, 0.5, "add"), (30, 2.0, "multi")]:
        picked = scope_select(x, a, k, alpha, combine)
        for row in range(2):
            assert picked.indices[row].tolist() == _scope_reference(x[row], a[row], k, alpha, combine)
        alone = scope_select(x[1:], a[1:], k, alpha, combine)
        assert alone.indices[0].tolist() == picked.indices[1].tolist()


def test_scope_in_model_uses_feature_layer_signals(tiny, batch_inputs):
    """In the model, SCOPE's saliency is the feature layer's [CLS] row summed over heads and its features the
    feature-layer patches: the kept sets equal scope_select on those signals recomputed from eager CLIP."""
    from vtprune.methods.scope import scope_select

    model = tiny[0]
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(batch_inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        with vtprune.pruned(model, "scope", keep=12):
            model(**batch_inputs)
            record = vtprune.last_record(model)
    saliency = out.attentions[-2][:, :, 0, 1:].sum(dim=1)
    expected = scope_select(out.hidden_states[-2][:, 1:], saliency, 12)
    assert record.stages[0].kept == expected.indices.tolist()


def test_scope_config_errors():
    assert vtprune.get_method("scope").stages(INFO_576)[0].keep == 64
    with pytest.raises(PruneConfigError, match="alpha"):
        vtprune.get_method("scope", alpha=-1.0)
    with pytest.raises(PruneConfigError, match="combine"):
        vtprune.get_method("scope", combine="max")


# --- HiPrune: anchors, buffers, registers ------------------------------------------------------------------


def _hiprune_attention(anchor):
    """4×4 grid: the object layer's global attention peaks at `anchor`; the feature layer's at 15 (.3), then
    12 (.2), the rest small and increasing with the index (.001·i)."""
    shallow = torch.full((1, 16), 0.01)
    shallow[0, anchor] = 0.5
    deep = torch.arange(16).float()[None] * 0.001
    deep[0, 15], deep[0, 12] = 0.3, 0.2
    return shallow, deep


def test_hiprune_hand_example():
    """Anchor 5 (row 1, col 1): buffers 4, 6, 1, 9; the register is 15 → {1, 4, 5, 6, 9, 15}. Anchor 4
    (row 1, col 0): the official flat ±1 wraps to 3 (end of row 0) → {0, 3, 4, 5, 8} + register 15; the
    grid neighbourhood has no left neighbour → {0, 4, 5, 8} + registers 15, 12."""
    from vtprune.methods.hiprune import anchor_count, hiprune_select

    shallow, deep = _hiprune_attention(5)
    picked, role = hiprune_select(shallow, deep, 6, 1, (4, 4))
    assert picked.indices.tolist() == [[1, 4, 5, 6, 9, 15]]
    assert role[0, [5, 1, 4, 6, 9, 15]].tolist() == [1, 2, 2, 2, 2, 3] and int((role > 0).sum()) == 6
    shallow, deep = _hiprune_attention(4)
    assert hiprune_select(shallow, deep, 6, 1, (4, 4))[0].indices.tolist() == [[0, 3, 4, 5, 8, 15]]
    grid = hiprune_select(shallow, deep, 6, 1, (4, 4), buffer="grid")[0]
    assert grid.indices.tolist() == [[0, 4, 5, 8, 12, 15]]
    # anchor 0: the clipped flat neighbours -1 and -4 are the anchor itself → {0, 1, 4} + 3 registers
    shallow, deep = _hiprune_attention(0)
    assert hiprune_select(shallow, deep, 6, 1, (4, 4))[0].indices.tolist() == [[0, 1, 4, 12, 14, 15]]
    # more structural tokens than the budget: anchor, then the -1, +1, -width blocks (the +width one is cut)
    shallow, deep = _hiprune_attention(5)
    assert hiprune_select(shallow, deep, 4, 1, (4, 4))[0].indices.tolist() == [[1, 4, 5, 6]]
    # no anchor (round(T·α/5) = 0): registers only, i.e. the top feature-layer attention
    assert hiprune_select(shallow, deep, 3, 0, (4, 4))[0].indices.tolist() == [[12, 14, 15]]
    assert [anchor_count(t, 0.1) for t in (64, 128, 192, 125)] == [1, 3, 4, 2]  # round half to even at 2.5


def test_hiprune_in_model_uses_global_attention_of_two_layers(tiny, batch_inputs, monkeypatch):
    """Object layer 1 (CLIP layer 0) and the feature layer (1): head mean, then mean over every query row of
    eager CLIP's attention probabilities, patch columns; captured q/k and recomputed q/k agree."""
    from vtprune.methods.hiprune import HiPrune, hiprune_select

    model = tiny[0]
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    seen = {}
    original = HiPrune.select

    def spy(self, i, stage, signals):
        seen["captured"] = sorted(signals.layer_captures)
        seen["received"] = signals.received_attention(0)
        again = copy.copy(signals)
        again.layer_captures, again.cache = {}, {}
        seen["recomputed"] = again.received_attention(0)
        return original(self, i, stage, signals)

    monkeypatch.setattr(HiPrune, "select", spy)
    with torch.no_grad():
        out = tower(batch_inputs["pixel_values"], output_attentions=True)
        with vtprune.pruned(model, "hiprune", keep=16, alpha=0.5):
            model(**batch_inputs)
            record = vtprune.last_record(model)
    shallow = out.attentions[0].mean(dim=1).mean(dim=1)
    deep = out.attentions[1].mean(dim=1).mean(dim=1)
    assert seen["captured"] == [0]
    torch.testing.assert_close(seen["received"], shallow, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(seen["recomputed"], shallow, rtol=1e-4, atol=1e-6)
    expected, _ = hiprune_select(shallow[:, 1:], deep[:, 1:], 16, 2, (8, 8))
    assert record.stages[0].kept == expected.indices.tolist()
    assert record.stages[0].extra["anchors"] == [2, 2, 2]


def test_hiprune_defaults_and_config_errors():
    method = vtprune.get_method("hiprune")
    assert method.stages(INFO_576)[0].keep == 64
    assert method.resolved_object_layer(INFO_576) == 9 and method.vision_attention_layers(INFO_576) == (8,)
    tiny_info = ModelInfo(
        num_layers=4, num_heads=4, visual_tokens=64, grid=(8, 8), vision_layers=3, vision_heads=4
    )
    assert method.resolved_object_layer(tiny_info) == 1
    for bad in ({"alpha": 1.5}, {"object_layer": 0}, {"buffer": "ring"}):
        with pytest.raises(PruneConfigError, match=next(iter(bad))):
            vtprune.get_method("hiprune", **bad)
    with pytest.raises(PruneConfigError, match="object_layer=4"):
        vtprune.get_method("hiprune", object_layer=4).validate_for(tiny_info)


# --- HoloV: per-crop quotas --------------------------------------------------------------------------------


def _holov_inputs():
    """8 tokens, 2 raster crops of 4. Crop 0: mutually orthogonal tokens (every off-diagonal S = 0, so every
    var_i = 0); crop 1: four copies of one vector (S = 1 off the diagonal, mean_i = 1, var_i = (3·0 + 1)/3).
    Attention: crop 0 [.2, .1, .05, .05], crop 1 [.12, .08, .1, .1]: both crop means are .1."""
    x = torch.zeros(1, 8, 4)
    x[0, :4] = torch.eye(4)
    x[0, 4:] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    a = torch.tensor([[0.2, 0.1, 0.05, 0.05, 0.12, 0.08, 0.1, 0.1]])
    return x, a


def test_holov_hand_example():
    """Crop scores: crop 0 = mean(1000·a) = 100 (no variance); crop 1 = 100 + .09·(1/3)·100/(1/3 + 1e-6)
    ≈ 109.
    Weights .478 / .522 of T = 4: ⌊1.91⌋ = 1, ⌊2.09⌋ = 2, the spare token to crop 1 → quotas [1, 3]: crop 0
    keeps token 0, crop 1 its three most attended (4, then 6 and 7 at .1 before 5) → {0, 4, 6, 7}. With
    α = 0 the scores tie (100, 100) → quotas [2, 2] → {0, 1, 4, 6}."""
    from vtprune.methods.holov import crop_ids, holov_select

    x, a = _holov_inputs()
    crop = crop_ids((2, 4), 2, "raster")
    assert crop.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    picked, scores, quotas = holov_select(x, a, 4, crop)
    torch.testing.assert_close(scores, torch.tensor([[100.0, 100 + 9 / (1 + 3e-6)]]))
    assert quotas.tolist() == [[1, 3]] and picked.indices.tolist() == [[0, 4, 6, 7]]
    picked, _, quotas = holov_select(x, a, 4, crop, alpha=0.0)
    assert quotas.tolist() == [[2, 2]] and picked.indices.tolist() == [[0, 1, 4, 6]]


def test_holov_quota_spill_and_partitions():
    """A quota larger than its crop spills to the crops with room (the official code zero-pads instead)."""
    from vtprune.methods.holov import crop_ids, holov_quotas

    # weights .9 / .1 of T = 7 over two crops of 4: ⌊6.3⌋ = 6, ⌊.7⌋ = 0, spare → crop 0: [7, 0] → [4, 3]
    assert holov_quotas(torch.tensor([[0.9, 0.1]]), torch.tensor([[4, 4]]), 7).tolist() == [[4, 3]]
    # three crops, the spill fills the next largest weight first: [6, 1, 1] of sizes 4, 2, 4 → [4, 2, 2]
    assert holov_quotas(torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[4, 2, 4]]), 8).tolist() == [[4, 2, 2]]
    blocks = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert crop_ids((4, 4), 4, "grid").view(4, 4).tolist() == blocks
    assert crop_ids((4, 4), 4, "raster").view(4, 4).tolist() == [[0] * 4, [1] * 4, [2] * 4, [3] * 4]
    assert crop_ids((24, 24), 16, "raster").bincount().tolist() == [36] * 16  # 1.5 image rows per crop
    assert crop_ids((1, 7), 3, "raster").tolist() == [0, 0, 0, 1, 1, 2, 2]  # the first runs one longer


def _holov_reference(x, a, crops, keep, alpha=0.09):
    """The official per-image loops (one image, contiguous crops), with vtprune's spill rule in place of the
    zero padding; returns the kept indices sorted."""
    n = x.shape[0]
    size, extra = divmod(n, crops)
    bounds, start = [], 0
    for p in range(crops):
        end = start + size + (1 if p < extra else 0)
        bounds.append((start, end))
        start = end
    scores = []
    for lo, hi in bounds:
        t, att = x[lo:hi], a[lo:hi]
        m = hi - lo
        if m <= 1:
            scores.append(float(att.mean()))
            continue
        f = t / (t.norm(dim=1, keepdim=True) + 1e-6)
        s = (f @ f.T) * (1 - torch.eye(m))
        mean = s.sum(dim=1) / (m - 1)
        var = ((s - mean[:, None]) ** 2).sum(dim=1) / (m - 1)
        att_s = att * 1e3
        scale = att_s.abs().mean() / (var.abs().mean() + 1e-6)
        scores.append(float((att_s + alpha * var * scale).mean()))
    total = sum(scores)
    weights = [s / (total + 1e-6) for s in scores]
    alloc = [math.floor(w * keep) for w in weights]
    by_weight = sorted(range(crops), key=lambda i: (-weights[i], i))
    for i in by_weight[: keep - sum(alloc)]:
        alloc[i] += 1
    sizes = [hi - lo for lo, hi in bounds]
    alloc = [min(q, s) for q, s in zip(alloc, sizes, strict=True)]
    for i in by_weight:
        alloc[i] += min(sizes[i] - alloc[i], keep - sum(alloc))
    kept = []
    for (lo, hi), q in zip(bounds, alloc, strict=True):
        kept += sorted(range(lo, hi), key=lambda j: (-float(a[j]), j))[:q]
    return sorted(kept)


@pytest.mark.parametrize("seed", range(3))
def test_holov_matches_plain_reference_on_random_inputs(seed):
    from vtprune.methods.holov import crop_ids, holov_select

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 50, 6, generator=g)
    a = torch.rand(2, 50, generator=g) ** 4  # skewed, so some quotas overflow at large budgets
    for crops, keep in [(16, 12), (7, 30), (5, 48), (50, 20)]:
        crop = crop_ids((1, 50), crops, "raster")
        picked, _, _ = holov_select(x, a, keep, crop)
        for row in range(2):
            assert picked.indices[row].tolist() == _holov_reference(x[row], a[row], crops, keep)
            assert bool(picked.valid[row].all())


def test_holov_in_model_and_config_errors(tiny, batch_inputs):
    """On the tiny model: projected tokens and the feature layer's [CLS] attention, quotas summing to T."""
    from vtprune.methods.holov import crop_ids, holov_select

    model = tiny[0]
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = tower(batch_inputs["pixel_values"], output_attentions=True).attentions
        attn = attentions[-2][:, :, 0, 1:].mean(1)
        projected = model.model.get_image_features(pixel_values=batch_inputs["pixel_values"]).pooler_output
        with vtprune.pruned(model, "holov", keep=10, crops=4, partition="grid"):
            model(**batch_inputs)
            record = vtprune.last_record(model)
    expected, _, quotas = holov_select(torch.stack(list(projected)), attn, 10, crop_ids((8, 8), 4, "grid"))
    assert record.stages[0].kept == expected.indices.tolist()
    assert record.stages[0].extra["quotas"] == quotas.tolist() and quotas.sum(dim=1).tolist() == [10] * 3
    assert vtprune.get_method("holov").stages(INFO_576)[0].keep == 64
    bad_values = [
        ({"crops": 0}, "crops"),
        ({"alpha": -1}, "alpha"),
        ({"partition": "x"}, "partition"),
        ({"crops": 8, "partition": "grid"}, "square"),
    ]
    for bad, match in bad_values:
        with pytest.raises(PruneConfigError, match=match):
            vtprune.get_method("holov", **bad)
    tiny_info = ModelInfo(
        num_layers=4, num_heads=4, visual_tokens=64, grid=(8, 8), vision_layers=3, vision_heads=4
    )
    with pytest.raises(PruneConfigError, match="patch grid"):
        vtprune.get_method("holov", crops=81, partition="grid").validate_for(tiny_info)
    with pytest.raises(PruneConfigError, match="more than"):
        vtprune.get_method("holov", crops=65).validate_for(tiny_info)
