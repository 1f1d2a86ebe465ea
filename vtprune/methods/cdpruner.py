"""CDPruner — "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(Zhang et al., NeurIPS 2025, arXiv 2506.10967).

Idea: pick the kept visual tokens as the greedy MAP of a determinantal point process whose kernel
L = diag(ρ̃)·S·diag(ρ̃) couples diversity (S = cosine similarity of the projected tokens) with relevance to the
question (ρ̃ = min–max normalised negated CLIP image–text cosine); the kept tokens enter the LLM in raster
order (docs/methods/cdpruner.md).

Parameters:
* keep (T, default 64; 64 / 128 / 192 are plain counts, CDPruner has no other budget knob).
* relevance: "clip" (default, the paper) or "none" (plain DPP on S with ρ̃ = 1: no text tower needed).
* clip_model: id or folder of a CLIP checkpoint with a text tower (default
  "openai/clip-vit-large-patch14-336", the tower LLaVA-1.5 was built on). Loaded lazily at the first prefill
  with `CLIPModel.from_pretrained` / `AutoTokenizer.from_pretrained` and cached per process (per path,
  device and dtype); only the text tower, `text_projection` and `visual_projection` are kept. A checkpoint
  that cannot be loaded (offline, not found) raises a PruneConfigError naming `clip_model`.
* prompt_tokenizer: how the question is read back from the prompt. The vision signals carry the prompt's
  token ids, not its text, so CDPruner decodes them with the LLaVA tokenizer: `prompt_tokenizer` (an id, a
  folder, or a tokenizer object) or, when None, the checkpoint the model was loaded from
  (`model.config._name_or_path`). A model built in memory has no such path: pass the tokenizer then
  (PruneConfigError naming `prompt_tokenizer` otherwise).

The question is the real text after the sample's last image token (a multi-image prompt asks after its
last image; a system prompt before the image is never included), decoded without special tokens, with
the trailing assistant-turn marker ("ASSISTANT:", "[/INST]", …) and LLaVA's answer-format instructions
("Answer the question using a single word or phrase.", "Answer with the option's letter from the given
choices directly.") removed; the match ignores case and whitespace, so word-level tokenizers decode fine.

Relevance: E_v = visual_projection(post_layernorm(X)) for the feature-layer patches X (the LLaVA tower's own
post-layernorm, as the official code; the CLIP checkpoint's when the tower has none), E_t = CLIP text
embeddings of the question, ρ_i = −mean over text segments of cos(E_v,i, E_t), computed in float32.

Deviations from the official code (Theia-4869/CDPruner @ 9541616; each keeps batch invariance or fixes an
edge case):
* min–max normalisation per image row, i.e. per sample for one image per prompt (the official code
  normalises over the whole batch tensor; both agree at batch size 1, the only size the official code
  runs); a constant ρ gives ρ̃ = 1.
* text longer than CLIP's 77 positions is split into segments of 75 tokens, each wrapped in its own
  BOS/EOS and pooled at its own EOS; the official code slices the raw token sequence into 77-token rows,
  so only its last row has an EOS and the others are pooled at their highest token id.
* the kernel's diagonal is exactly ρ̃² (S_ii = 1): the cosine of a token with itself comes out of float32
  as 0.99999988… or 1.0000001 depending on the backend, and with a flat or near-flat ρ̃ that noise alone
  decided the first greedy pick (SDPA and eager towers selected different tokens in the tests).
* the DPP guard of `vtprune.selection.dpp_greedy` (exhausted candidates add no update instead of a NaN).
* a repeated question in a batch is encoded once (no effect on the result).
* the optional θ re-weighting (commented out in the official code) is not offered.
* LLaVA-NeXT: the official rule (an equal budget per view, each with its own [CLS]) is `crop_budget="crop"`,
  the default (`vtprune.methods.base.CropBudget`); the official code's 672 x 672 pin with no
  unpadding and no `image_newline` is not the HF model's input and is not reproduced.
  On NeXT the relevance is min-max normalised per tower input (the official code: over all views).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtprune.errors import PruneConfigError
from vtprune.methods.base import CropBudget, Method, Selection, register
from vtprune.selection import check_2d, check_features, check_valid, cosine_matrix, dpp_greedy

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"

# LLaVA's answer-format instructions, stripped from the end of the question.
INSTRUCTION_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
)
# Assistant-turn markers that end a chat prompt (vicuna_v1 / llava-hf, Llama-2 chat); matched ignoring case.
ROLE_MARKERS = ("ASSISTANT:", "[/INST]")


def _loose_pattern(text: str) -> str:
    """A regex matching `text` at the end of a string with any whitespace between its words and marks."""
    parts = re.findall(r"\w+|[^\w\s]", text)
    return r"\s*".join(re.escape(p) for p in parts) + r"\s*$"


_SUFFIX_RES = [re.compile(r"\s*" + _loose_pattern(s), re.IGNORECASE) for s in INSTRUCTION_SUFFIXES]
_ROLE_RES = [re.compile(r"\s*" + _loose_pattern(m), re.IGNORECASE) for m in ROLE_MARKERS]


def clean_question(text: str) -> str:
    """The question CLIP encodes: `text` without the trailing role marker and answer-format instructions."""
    text = text.strip()
    for pattern in _ROLE_RES:
        stripped = pattern.sub("", text, count=1)
        if stripped != text:
            text = stripped
            break
    changed = True
    while changed:
        changed = False
        for pattern in _SUFFIX_RES:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped, True
    return text.strip()


def find_post_layernorm(module: nn.Module | None) -> nn.LayerNorm | None:
    """A CLIP vision tower's final LayerNorm (`post_layernorm`, wherever the transformers version puts it)."""
    if module is None:
        return None
    for name, child in module.named_modules():
        if name == "post_layernorm" or name.endswith(".post_layernorm"):
            return child
    return None


class ClipRelevanceParts(nn.Module):
    """The parts of a CLIP checkpoint CDPruner needs (the vision encoder itself is dropped)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection
        self.visual_projection = clip.visual_projection
        self.post_layernorm = find_post_layernorm(clip.vision_model)
        self.max_length = int(clip.config.text_config.max_position_embeddings)
        self.vision_width = int(clip.config.vision_config.hidden_size)


_CLIP_CACHE: dict[tuple[str, str, torch.dtype], tuple[ClipRelevanceParts, Any]] = {}
_TOKENIZER_CACHE: dict[str, Any] = {}


def load_clip_parts(source: str, device: torch.device | str, dtype: torch.dtype) -> tuple[ClipRelevanceParts, Any]:
    """(text tower + projections on `device` in `dtype`, CLIP tokenizer) of a CLIP checkpoint; cached."""
    key = (str(source), str(device), dtype)
    if key not in _CLIP_CACHE:
        from transformers import AutoTokenizer, CLIPModel

        try:
            clip = CLIPModel.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as err:
            raise PruneConfigError(
                f"cdpruner: could not load the CLIP text tower from clip_model={source!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Pass clip_model=<Hugging Face id or local folder "
                "of a CLIP checkpoint with a text tower and tokenizer> (download it first when offline), or "
                "relevance='none' to run without text relevance."
            ) from None
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise PruneConfigError(f"cdpruner: the tokenizer of clip_model={source!r} has no BOS/EOS token")
        parts = ClipRelevanceParts(clip).to(device).eval()
        parts.requires_grad_(False)
        _CLIP_CACHE[key] = (parts, tokenizer)
    return _CLIP_CACHE[key]


def load_prompt_tokenizer(source: str) -> Any:
    if source not in _TOKENIZER_CACHE:
        from transformers import AutoTokenizer

        try:
            _TOKENIZER_CACHE[source] = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError) as err:
            raise PruneConfigError(
                f"cdpruner: could not load the LLaVA tokenizer from prompt_tokenizer={source!r} "
                f"({type(err).__name__}); pass prompt_tokenizer=<id, folder or tokenizer object> of the model's "
                "tokenizer, or relevance='none'"
            ) from None
    return _TOKENIZER_CACHE[source]


@torch.no_grad()
def clip_text_embeddings(parts: ClipRelevanceParts, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, E) CLIP text embeddings of each text's segments and (B, S) segment validity.

    A text longer than the tower's positions is cut into segments of `max_length - 2` tokens, each wrapped
    in BOS … EOS and pooled at its EOS (the embedding is `text_projection` of that state).
    """
    chunk = parts.max_length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows, owner = [], []
    for b, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] or [[]]
        for piece in pieces:
            rows.append([bos, *piece, eos])
            owner.append(b)
    width = max(len(r) for r in rows)
    device = parts.text_projection.weight.device
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    eos_pos = mask.sum(dim=1) - 1
    hidden = parts.text_model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    pooled = hidden[torch.arange(len(rows), device=device), eos_pos.to(device)]
    emb = parts.text_projection(pooled).float()
    segments = max(owner.count(b) for b in range(len(texts)))
    out = emb.new_zeros(len(texts), segments, emb.shape[-1])
    valid = torch.zeros(len(texts), segments, dtype=torch.bool, device=device)
    slot = [0] * len(texts)
    for i, b in enumerate(owner):
        out[b, slot[b]] = emb[i]
        valid[b, slot[b]] = True
        slot[b] += 1
    return out, valid


def clip_relevance(
    features: torch.Tensor,
    text_embeds: torch.Tensor,
    segment_valid: torch.Tensor,
    post_layernorm: nn.LayerNorm,
    visual_projection: nn.Linear,
) -> torch.Tensor:
    """(N, P) CDPruner relevance ρ = −mean over segments of cos(visual_projection(LN(x_i)), E_t) (float32).

    `features` (N, P, Dv) feature-layer patches; `text_embeds` (N, S, E) and `segment_valid` (N, S) the text
    segments of each row's question.
    """
    x = F.layer_norm(
        features.float(), post_layernorm.normalized_shape, post_layernorm.weight.float(),
        post_layernorm.bias.float() if post_layernorm.bias is not None else None, post_layernorm.eps,
    )
    bias = visual_projection.bias.float() if visual_projection.bias is not None else None
    image = F.normalize(F.linear(x, visual_projection.weight.float(), bias), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1)
    cos = image @ text.transpose(1, 2)  # (N, P, S)
    weights = segment_valid.to(cos.dtype)[:, None, :]
    return -(cos * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1.0)


def cdpruner_kernel(
    similarity_features: Tensor,
    relevance: Tensor,
    valid: Tensor | None = None,
    *,
    eps: float = 1e-6,
) -> Tensor:
    """CDPruner's conditional DPP kernel ``L = diag(ρ̃) · S · diag(ρ̃)`` (arXiv 2506.10967, Sec. 3).

    ``S`` is the cosine similarity of ``similarity_features`` (projected features), ``ρ̃`` the min–max
    normalised relevance ``(ρ - min ρ + eps) / (max ρ - min ρ)``. **Min and max are taken per sample**
    (over that sample's valid tokens), not over the whole batch tensor as the official code does — the
    two agree at batch size 1, and only the per-sample version keeps samples independent. A sample whose
    relevance is constant gets ``ρ̃ = 1`` everywhere (pure diversity) instead of a division by zero.
    The sign convention of ρ (CDPruner negates the CLIP cosine) is the caller's business.

    Args:
        similarity_features: ``(B, N, D)`` features defining S (float32 inside).
        relevance: ``(B, N)`` raw relevance ρ.
        valid: optional ``(B, N)`` mask restricting the min/max to valid tokens.
        eps: the additive constant of the official normalisation.

    Returns:
        ``(B, N, N)`` float32 kernel, exactly symmetric.
    """
    check_2d("relevance", relevance)
    b, n = relevance.shape
    check_features("similarity_features", similarity_features, b, n)
    v = check_valid(valid, b, n, relevance.device)
    rel = relevance.float()
    lo = torch.where(v, rel, float("inf")).amin(dim=-1, keepdim=True)
    hi = torch.where(v, rel, float("-inf")).amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # constant relevance (or no valid token): no ranking information
    rho = torch.where(flat, torch.ones_like(rel), (rel - lo + eps) / torch.where(flat, 1.0, span))
    s = cosine_matrix(similarity_features, dup_tol=0.0)
    # (ρ_i ρ_j) S_ij: the outer product is symmetric bit-for-bit, so L is exactly symmetric
    return (rho.unsqueeze(-1) * rho.unsqueeze(-2)) * s


@register
@dataclass
class CDPruner(Method):
    """Conditional DPP: diversity of projected tokens weighted by CLIP relevance to the question."""

    relevance: Literal["clip", "none"] = "clip"
    clip_model: str = DEFAULT_CLIP
    prompt_tokenizer: Any = None
    crop_budget: CropBudget = "crop"  # LLaVA-NeXT: an equal share per tower input (official rule)

    name = "cdpruner"
    stage_kind = "vision"
    paper = "arXiv 2506.10967"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.clip_model:
            raise PruneConfigError(f"{self.name}: clip_model must be a Hugging Face id or a local folder")
        tok = self.prompt_tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(getattr(tok, "decode", None)):
            raise PruneConfigError(f"{self.name}: prompt_tokenizer must be an id, a folder or a tokenizer object")

    def params(self) -> dict:
        out = super().params()
        tok = self.prompt_tokenizer
        if tok is not None and not isinstance(tok, str):  # keep the record JSON-friendly
            out["prompt_tokenizer"] = getattr(tok, "name_or_path", None) or type(tok).__name__
        return out

    # --- the question ------------------------------------------------------------------------------------
    def _prompt_tokenizer(self, signals):
        tok = self.prompt_tokenizer
        if tok is not None and not isinstance(tok, str):
            return tok
        source = tok or getattr(signals.adapter.config, "_name_or_path", "") or ""
        if not source:
            raise PruneConfigError(
                "cdpruner: relevance='clip' reads the question back from the prompt token ids and needs the "
                "LLaVA tokenizer to decode them, but the model was not loaded from a checkpoint "
                "(config._name_or_path is empty): pass prompt_tokenizer=<id, folder or tokenizer object>, or "
                "relevance='none'"
            )
        return load_prompt_tokenizer(source)

    def questions(self, signals) -> list[str]:
        """Per sample: the question text (after the last image token, instructions stripped)."""
        tokenizer = self._prompt_tokenizer(signals)
        ids = signals.input_ids
        is_image = ids == signals.adapter.image_token_id
        pos = torch.arange(ids.shape[1], device=ids.device)
        last_image = torch.where(is_image, pos, -1).amax(dim=1)
        after = (pos > last_image[:, None]) & signals.text_valid & ~is_image
        out = []
        for row, keep in zip(ids.tolist(), after.tolist(), strict=True):
            tokens = [t for t, k in zip(row, keep, strict=True) if k]
            out.append(clean_question(tokenizer.decode(tokens, skip_special_tokens=True)))
        return out

    # --- relevance ---------------------------------------------------------------------------------------
    def relevance_scores(self, signals) -> torch.Tensor | None:
        """(N, P) raw relevance ρ (negated CLIP cosine), or None for relevance='none'."""
        if self.relevance == "none":
            return None
        features = signals.features
        parts, clip_tokenizer = load_clip_parts(self.clip_model, features.device, signals.hidden.dtype)
        if parts.vision_width != features.shape[-1]:
            raise PruneConfigError(
                f"cdpruner: clip_model={self.clip_model!r} has vision width {parts.vision_width}, but the LLaVA "
                f"vision tower's features have width {features.shape[-1]}; pass the CLIP checkpoint the tower "
                "was built from"
            )
        texts = self.questions(signals)
        unique = list(dict.fromkeys(texts))  # a batch often repeats a question: encode each text once
        text_embeds, segment_valid = clip_text_embeddings(parts, clip_tokenizer, unique)
        which = torch.tensor([unique.index(t) for t in texts], device=text_embeds.device)
        text_embeds, segment_valid = text_embeds[which], segment_valid[which]
        layernorm = find_post_layernorm(getattr(signals.adapter, "vision_tower", None))
        if layernorm is None:
            layernorm = parts.post_layernorm
        rows = signals.image_sample.to(text_embeds.device)
        return clip_relevance(features, text_embeds[rows], segment_valid[rows], layernorm, parts.visual_projection)

    def select(self, stage_index, stage, signals) -> Selection:
        projected = signals.projected
        rho = self.relevance_scores(signals)
        if rho is None:
            rho = projected.new_zeros(projected.shape[:2], dtype=torch.float32)
        rho = rho.to(projected.device)
        kernel = cdpruner_kernel(projected, rho)  # per-row min–max of ρ inside
        # S_ii = x̂_i·x̂_i is 1 only up to float rounding (0.99999988…, different for SDPA and eager towers,
        # devices, batch shapes), and when ρ̃ is flat that noise alone would pick the first token. Use the
        # exact diagonal L_ii = ρ̃_i²: the kernel of 1-d features (S = 1 everywhere) is ρ̃ρ̃ᵀ.
        b, n = rho.shape
        rho_sq = cdpruner_kernel(projected.new_ones(b, n, 1), rho).diagonal(dim1=-2, dim2=-1)
        diag = kernel.diagonal(dim1=-2, dim2=-1)
        diag.copy_(torch.where(diag > 0, rho_sq, diag))  # a zero feature keeps S_ii = 0
        picked = dpp_greedy(kernel, stage.keep)
        scores = rho_sq.sqrt() if self.relevance != "none" else None
        return Selection(*picked, scores=scores, all_valid=True)  # every token a candidate: each slot holds one
