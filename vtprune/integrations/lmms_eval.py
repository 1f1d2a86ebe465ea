"""lmms-eval model plugin: any lmms-eval task with any vtprune method on a Hugging Face LLaVA / LLaVA-NeXT model.

    pip install "vtprune[lmms]"
    lmms-eval --model vtprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,keep=64,K=2 \\
        --tasks pope --batch_size 8 --log_samples --output_path logs/

lmms-eval (0.7.x) finds the model through the `lmms_eval.models` entry-point group declared in vtprune's
pyproject.toml (vtprune/integrations/lmms_eval_entry.py); nothing is patched into lmms-eval. `model_args` keys:

  pretrained           Hub id, local folder or `testbed` (required)
  method, keep         vtprune method (`vtprune methods`) and budget: a count, a fraction or `320/2880`
  template             hf (the processor's chat template, default) | vicuna_v1 (LLaVA's conversation prompt)
  preprocessing        crop (processor default) | pad (LLaVA's expand2square)
  paper_setting        true: vicuna_v1 + the family's paper preprocessing (as `vtprune eval --paper-setting`)
  dtype, device, attn_implementation, revision
  anything else        a hyper-parameter of the method, e.g. `K=2`, `important_ratio=0.1` (JSON values parsed)

The prompt is built the way `vtprune eval` builds it (vtprune.eval.predictor.Predictor) around the text the
task gives (its pre/post prompts included); requests are generated in left-padded batches of `--batch_size`.
Every response carries vtprune's record of that sample, so `--log_samples` writes it beside lmms-eval's own
per-sample fields: `token_counts[i]["vtprune"]` holds the method, budget, visual tokens before pruning, kept
tokens per stage, tokens after pruning and the layer-averaged count. lmms-eval has no other per-sample channel
for a model's facts; its `TokenCounts` is extended with one field that its `to_dict()` includes.

Supported requests: `generate_until` with zero or one image per sample (every LLaVA-1.5 benchmark); other
request types and several images per sample are refused with an error that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image

from vtprune.eval.predictor import IMAGE_PLACEHOLDER, Generation, Predictor
from vtprune.userinput import parse_keep, parse_value


@dataclass
class VTPruneTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counters plus vtprune's record, logged under the key `vtprune`."""

    vtprune: dict | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.vtprune is not None:
            out["vtprune"] = self.vtprune
        return out


class _RequestPredictor(Predictor):
    """vtprune's predictor with the generation settings of the current lmms-eval request group."""

    overrides: dict[str, Any] = {}

    def _generation_config(self):
        config = super()._generation_config()
        for name, value in self.overrides.items():
            setattr(config, name, value)
        return config


def _value(raw: Any) -> Any:
    """lmms-eval parses numbers and booleans in model_args; lists and dicts arrive as strings, read like
    vtprune's own `--param` values."""
    return parse_value(raw) if isinstance(raw, str) else raw


class VTPruneLMM(lmms):
    """A vtprune-pruned Hugging Face LLaVA model as an lmms-eval `simple` model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        keep: int | float | str | None = None,
        template: str | None = None,
        preprocessing: str | None = None,
        paper_setting: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str = "sdpa",
        revision: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **method_params: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        import vtprune
        from vtprune.eval.commands import model_type_of, resolve_setting

        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError as exc:
            raise ValueError(f"--batch_size must be a whole number for --model vtprune, got {batch_size!r}") from exc
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        accelerator = Accelerator()
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if device in (None, "", "auto"):
            # one process per GPU under `accelerate launch`; lmms-eval shards the requests by rank
            device = "auto"
        template, preprocessing = resolve_setting(template, preprocessing, bool(paper_setting),
                                                  model_type_of(str(pretrained)))
        self.predictor = _RequestPredictor.from_pretrained(
            str(pretrained), dtype=dtype, device=_device(device, accelerator.local_process_index),
            attn_implementation=attn_implementation, revision=revision, template=template,
            preprocessing=preprocessing,
        )
        self.method = str(method)
        self.keep = None if keep in (None, "", "none", "None") else parse_keep(keep)
        self.params = {name: _value(value) for name, value in method_params.items()}
        self.predictor.set_method(self.method, self.keep, self.params)
        self.pretrained = str(pretrained)
        self._vtprune_version = getattr(vtprune, "__version__", "unknown")

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def model(self):
        return self.predictor.model

    @property
    def tokenizer(self):
        return self.predictor.processor.tokenizer

    @property
    def device(self):
        return self.predictor.model.device

    # ---------------------------------------------------------------------------------------- requests

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one generation config per batch
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vtprune generating")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = self._configure(gen_kwargs)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                questions, images = zip(*(self._inputs(requests[i]) for i in batch), strict=True)
                outputs = self.predictor.generate(list(questions), list(images))
                for i, out in zip(batch, outputs, strict=True):
                    text = _cut(out.text, until)
                    results[i] = GenerationResult(text=text, token_counts=self._counts(out))
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _configure(self, gen_kwargs: dict[str, Any]) -> list[str]:
        """Apply one request group's generation settings; returns its stop strings."""
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        self.predictor.max_new_tokens = int(gen_kwargs.get("max_new_tokens") or 1024)
        temperature = float(gen_kwargs.get("temperature") or 0)
        overrides: dict[str, Any] = {"num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if temperature > 0 or gen_kwargs.get("do_sample"):
            overrides.update(do_sample=True, temperature=temperature or 1.0, top_p=gen_kwargs.get("top_p"))
        self.predictor.overrides = overrides
        return list(until)

    def _inputs(self, request: Instance) -> tuple[str, Image.Image | None]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            raise ValueError(
                f"--model vtprune takes one image per sample; task {task!r} doc {doc_id} has {len(visuals)}"
            )
        if visuals and not isinstance(visuals[0], Image.Image):
            raise ValueError(f"--model vtprune takes images; task {task!r} gives {type(visuals[0]).__name__}")
        # the predictor places the image itself (its template); a task's own placeholder would be a second one
        question = context.replace(IMAGE_PLACEHOLDER, "").strip()
        return question, (visuals[0].convert("RGB") if visuals else None)

    def _counts(self, out: Generation) -> VTPruneTokenCounts:
        record = {
            "method": self.method,
            "keep": self.keep,
            "params": self.params,
            "visual_tokens": out.visual_tokens,
            "kept_tokens": out.kept_tokens,
            "tokens_after_pruning": out.tokens_after_pruning,
            "layer_avg_tokens": out.layer_avg_tokens,
            "prefill_tflops": out.prefill_tflops,
            "template": self.predictor.template,
            "preprocessing": self.predictor.preprocessing,
            "vtprune": self._vtprune_version,
        }
        return VTPruneTokenCounts(input_tokens=out.prompt_tokens, vtprune=record)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "--model vtprune runs generate_until tasks (pruning happens in generate()); "
            "this task asks for loglikelihood"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model vtprune runs generate_until tasks; this task is multi-round")


def _device(device: str, local_rank: int) -> str:
    from vtprune.eval.predictor import resolve_device

    return resolve_device(device, local_rank)


def _cut(text: str, until: list[str]) -> str:
    """The answer up to the first stop string the task gave."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()
