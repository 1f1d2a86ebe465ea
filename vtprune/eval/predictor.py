"""The model side of an evaluation: load a LLaVA checkpoint, build prompts, preprocess, generate, read records.

One object owns the model so a sweep loads the weights once and only switches the pruning method between
cells (`set_method` = `vtprune.unprune` + `vtprune.prune`). Decoding is greedy with left padding, so batch
results match single-sample results up to numerical noise.

Prompt templates (recorded with every run):
  hf         the processor's own chat template (llava-hf: "USER: <image>\\n{q} ASSISTANT:").
  vicuna_v1  LLaVA's conversation template, with its system prompt: "{system} USER: <image>\\n{q} ASSISTANT:".
Preprocessing:
  crop       the llava-hf default (resize the short side, centre crop).
  pad        LLaVA's `expand2square` (pad to a square with the CLIP mean colour, then the processor), i.e. the
             original LLaVA-1.5 evaluation; done by the processor's `do_pad` where it means exactly that
             (LlavaImageProcessor), otherwise here with PIL.
"""

from __future__ import annotations

import copy
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vtprune import compat
from vtprune.compiled import generation_kwargs
from vtprune.eval.config import VICUNA_V1_SYSTEM
from vtprune.eval.images import expand_to_square, mean_colour

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Generation:
    """One sample's output and what the pruning left of its image."""

    text: str
    prompt: str
    visual_tokens: int
    kept_tokens: dict[str, int] = field(default_factory=dict)  # per stage name, after that stage
    tokens_after_pruning: int = 0
    layer_avg_tokens: float = 0.0
    prompt_tokens: int = 0  # prompt length without padding, image tokens included
    layer_visual_tokens: list[int] | None = None  # visual tokens entering each LLM layer (None: all layers same)
    prefill_tflops: float | None = None  # theoretical prefill cost (vtprune.bench.flops), when available


def resolve_device(device: str, local_rank: int = 0) -> str:
    """`auto` -> this process's GPU (`cuda:LOCAL_RANK`) when there is one, else `cpu`."""
    if device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` -> float16 on GPUs (the llava-hf checkpoints' dtype), float32 on CPU (half is slow there)."""
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


class Predictor:
    """Wraps a `LlavaForConditionalGeneration` and its processor for batched greedy evaluation."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        template: str = "hf",
        preprocessing: str = "crop",
        max_new_tokens: int = 128,
        model_id: str | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.template = template
        self.preprocessing = preprocessing
        self.max_new_tokens = max_new_tokens
        self.compile = compile  # compiled decoding (vtprune/compiled.py)
        self.model_id = model_id or getattr(model.config, "_name_or_path", "")
        self.method = "none"
        self.keep: int | float | None = None
        self.params: dict[str, Any] = {}
        tokenizer = processor.tokenizer
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token_id = getattr(model.config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(model.config, "image_token_index", None)
        self._pad_in_processor = type(processor.image_processor).__name__.startswith("LlavaImageProcessor")
        self._flops: Any = None  # (ArchSpec, prefill_flops) once resolved, False when unavailable

    # ------------------------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        template: str = "hf",
        preprocessing: str = "crop",
        max_new_tokens: int = 128,
        compile: bool = False,
    ) -> Predictor:
        """Load model + processor with `from_pretrained` (Hub id, local folder or `testbed`)."""
        from vtprune.loading import load_model

        device = resolve_device(device)
        torch_dtype = getattr(torch, resolve_dtype(dtype, device))
        model, processor = load_model(
            model_id, device=device, dtype=torch_dtype, attn_implementation=attn_implementation, revision=revision
        )
        return cls(
            model,
            processor,
            template=template,
            preprocessing=preprocessing,
            max_new_tokens=max_new_tokens,
            model_id=model_id,
            compile=compile,
        )

    # ------------------------------------------------------------------------------------ pruning

    def set_method(self, method: str, keep: int | float | None = None, params: dict[str, Any] | None = None) -> None:
        """Make `method` (with budget and parameters) the active pruning; `none` removes pruning."""
        params = dict(params or {})
        if (method, keep, params) == (self.method, self.keep, self.params):
            return
        import vtprune

        if self.method != "none":
            vtprune.unprune(self.model)
        self.method, self.keep, self.params = "none", None, {}
        if method != "none":
            vtprune.prune(self.model, method, keep=keep, **params)
            self.method, self.keep, self.params = method, keep, params

    # ------------------------------------------------------------------------------------ prompts

    def build_prompt(self, question: str, has_image: bool = True) -> str:
        """The full text prompt for one sample, image placeholder included."""
        if self.template == "vicuna_v1":
            # conv_vicuna_v1.get_prompt(): system + " " + "USER: " + msg + " " + "ASSISTANT:"
            body = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
            return f"{VICUNA_V1_SYSTEM} USER: {body} ASSISTANT:"
        content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": question})
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        body = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
        return f"USER: {body} ASSISTANT:"

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """Apply the `pad` preprocessing where the processor does not do it itself."""
        if self.preprocessing == "pad" and not self._pad_in_processor:
            return expand_to_square(image, mean_colour(getattr(self.processor.image_processor, "image_mean", None)))
        return image

    # ------------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, questions: list[str], images: list[Image.Image | None]) -> list[Generation]:
        """Greedy answers for a batch (one image or none per sample)."""
        prompts = [self.build_prompt(q, img is not None) for q, img in zip(questions, images, strict=True)]
        pixels = [self.prepare_image(img) for img in images if img is not None]
        kwargs: dict[str, Any] = {"text": prompts, "padding": True, "return_tensors": "pt"}
        if pixels:
            kwargs["images"] = pixels
            if self.preprocessing == "pad" and self._pad_in_processor:
                kwargs["do_pad"] = True
        inputs = self.processor(**kwargs).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        output = self.model.generate(**inputs, generation_config=self._generation_config())
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = [t.strip() for t in self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        visual = (
            (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()
            if self.image_token_id is not None
            else [0] * len(texts)
        )
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        results = [
            Generation(text=t, prompt=p, visual_tokens=int(v), tokens_after_pruning=int(v),
                       layer_avg_tokens=float(v), prompt_tokens=int(n))
            for t, p, v, n in zip(texts, prompts, visual, lengths, strict=True)
        ]
        if self.method != "none":
            self._attach_record(results)
        self._attach_flops(results)
        return results

    def _generation_config(self):
        config = copy.deepcopy(self.model.generation_config)
        config.do_sample = False
        config.num_beams = 1
        config.max_new_tokens = self.max_new_tokens
        for key, value in generation_kwargs(self.compile).items():
            setattr(config, key, value)
        # Unset sampling knobs a checkpoint may carry, so greedy decoding raises no "flag ignored" warnings.
        config.temperature = None
        config.top_p = None
        config.top_k = None
        if config.pad_token_id is None:
            config.pad_token_id = self.processor.tokenizer.pad_token_id
        return config

    def _attach_record(self, results: list[Generation]) -> None:
        import vtprune

        record = vtprune.last_record(self.model)
        if record is None:
            return
        after = record.tokens_after_pruning
        layer_avg = record.layer_avg_tokens
        for i, result in enumerate(results):
            result.visual_tokens = int(record.sample_tokens(i))
            result.kept_tokens = {
                (stage.name or f"stage{j}"): int(stage.counts[i]) for j, stage in enumerate(record.stages)
            }
            if after:
                result.tokens_after_pruning = int(after[i])
            if layer_avg:
                result.layer_avg_tokens = float(layer_avg[i])
            if record.stages:
                result.layer_visual_tokens = [int(n) for n in record.layer_tokens(i)]

    def _attach_flops(self, results: list[Generation]) -> None:
        """Theoretical prefill TFLOPs per sample from the tokens each LLM layer saw (when bench/flops.py can
        describe the model's architecture)."""
        from vtprune.bench.flops import ArchSpec, prefill_flops

        if self._flops is None:
            try:
                self._flops = (ArchSpec.from_config(self.model.config), prefill_flops)
            except (ValueError, KeyError, AttributeError, TypeError):  # a config it cannot read: no FLOPs
                self._flops = False
        if not self._flops:
            return
        spec, prefill_flops = self._flops
        for r in results:
            text = r.prompt_tokens - r.visual_tokens
            visual = r.layer_visual_tokens or [r.tokens_after_pruning] * spec.num_layers
            try:
                flops = prefill_flops(spec, [text + v for v in visual])["total"]
            except (ValueError, IndexError):  # token counts it cannot place (a layer count mismatch)
                return
            r.prefill_tflops = flops / 1e12

    # ------------------------------------------------------------------------------------ facts

    def environment(self) -> dict[str, Any]:
        """Versions and hardware facts recorded in summary.json."""
        import transformers

        import vtprune

        device = self.model.device
        if device.type == "cuda":
            device_name = torch.cuda.get_device_name(device)
        else:
            device_name = platform.processor() or platform.machine() or "cpu"
        config = self.model.config
        text_config = getattr(config, "text_config", config)
        return {
            "vtprune": getattr(vtprune, "__version__", "unknown"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "device": str(device),
            "device_name": device_name,
            "cuda": torch.version.cuda,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "attn_implementation": compat.attention_implementation(text_config),
            "model_id": self.model_id,
            "template": self.template,
            "preprocessing": self.preprocessing,
            "preprocessing_impl": (
                "processor do_pad" if self._pad_in_processor else "expand_to_square (PIL)"
            )
            if self.preprocessing == "pad"
            else (
                "processor default (AnyRes: base view + tiles)"
                if getattr(self.processor.image_processor, "image_grid_pinpoints", None)
                else "processor default (resize + centre crop)"
            ),
            "image_processor": type(self.processor.image_processor).__name__,
        }
