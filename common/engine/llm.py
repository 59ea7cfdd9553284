"""Offline API: ``LLM(...).generate(prompts, params)`` and ``LLM(...).embed(prompts)``."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.detokenizer import IncrementalDetokenizer
from common.engine.config import EngineConfig
from common.engine.embedding import DEFAULT_POOLING, embed_token_lists
from common.engine.engine import LLMEngine, SequenceOutput
from common.engine.multimodal import ImageItem
from common.engine.sampler import TokenLogprobs
from common.engine.sampling_params import SamplingParams
from common.stop_strings import StopStringMatcher
from common.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["LLM", "RequestOutput", "CompletionOutput", "BeamSearchOutput", "BeamSequence"]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None  # beam search: the beam's summed log-probability


@dataclass
class BeamSequence:
    """One beam of `LLM.beam_search`: its output tokens (with the stop token that ended it, if
    any), their text, and its summed log-probability."""

    token_ids: list[int]
    text: str
    cumulative_logprob: float
    finish_reason: str | None


@dataclass
class BeamSearchOutput:
    """One prompt's beams, best first (by length-penalised score); indexable like a list."""

    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> BeamSequence:
        return self.sequences[index]

    def __iter__(self):
        return iter(self.sequences)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    # The first choice, for the common n=1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class _ChoiceText:
    """Detokenizes one choice and applies its stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop)
        self.text = ""

    def push(self, token_ids: list[int]) -> bool:
        """Returns True when a stop string matched."""
        self.text += self.stops.feed(self.detok.push(token_ids))
        return self.stops.matched is not None

    def finish(self) -> None:
        self.text += self.stops.feed(self.detok.flush())
        self.text += self.stops.flush()


class LLM:
    """Load a model (default: SmolLM2-135M-Instruct GGUF) and generate offline."""

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = load_tokenizer(self.engine.model_path)
        self._ids = itertools.count()
        self._image_processor = None  # the model's own, loaded on the first request with images

    def chat(self, conversations, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate a reply for each conversation (a list of ``{"role", "content"}`` messages).

        A content part ``{"type": "image", "image": <PIL image>}`` puts an image in the prompt
        (vision-language models)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.encode_chat(conv, add_generation_prompt=True) for conv in conversations]
        images = [[part["image"] for m in conv if isinstance(m.get("content"), list) for part in m["content"]
                   if isinstance(part, dict) and part.get("type") == "image"] for conv in conversations]
        return self.generate(prompts, params, images=images if any(images) else None)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        priority: str = "online",
        on_output: Callable[[SequenceOutput], object] | None = None,
        images: list[list] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results come back in prompt order. `on_output` sees each
        step's output of each choice as it comes (a progress bar).

        ``images`` (vision-language models): per prompt, a list of PIL images (the prompt holds one
        image pad token per image, as a chat template writes it; it is expanded here) or of
        :class:`ImageItem` (the prompt already expanded)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts")

        results: dict[str, RequestOutput] = {}
        texts: dict[tuple[str, int], _ChoiceText] = {}
        order: list[str] = []
        try:
            for k, (prompt, p) in enumerate(zip(prompts, params)):
                if isinstance(prompt, str):
                    ids, text = self.tokenizer.encode(prompt), prompt
                else:
                    ids, text = list(prompt), None
                items = None
                if images is not None and images[k]:
                    ids, items = self._image_prompt(ids, list(images[k]))
                rid = f"offline-{next(self._ids)}"
                self.engine.add_request(rid, ids, p, priority=priority, images=items)
                order.append(rid)
                results[rid] = RequestOutput(
                    rid, text, ids, [CompletionOutput(i, logprobs=[] if p.logprobs is not None else None)
                                     for i in range(p.n)],
                )
                for i in range(p.n):
                    texts[(rid, i)] = _ChoiceText(self.tokenizer, ids, p)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    self._apply(out, results[out.request_id], texts[(out.request_id, out.index)])
                    if on_output is not None:
                        on_output(out)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return [results[rid] for rid in order]

    def beam_search(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        beam_width: int = 4,
        max_tokens: int = 16,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        allowed_token_ids: list[int] | None = None,
        priority: str = "online",
    ) -> list[BeamSearchOutput]:
        """Beam search per prompt (vLLM's ``LLM.beam_search``): its ``beam_width`` best beams, best
        first, scored and stopped as transformers' ``generate(num_beams=beam_width)``. Prompts
        are strings or token-id lists. ``allowed_token_ids`` restricts every generated token."""
        params = SamplingParams(
            n=beam_width, use_beam_search=True, temperature=0.0, max_tokens=max_tokens, length_penalty=length_penalty,
            early_stopping=early_stopping, ignore_eos=ignore_eos, min_tokens=min_tokens,
            allowed_token_ids=allowed_token_ids,
        )
        return [
            BeamSearchOutput(result.prompt, result.prompt_token_ids, [
                BeamSequence(list(choice.token_ids), choice.text, choice.cumulative_logprob, choice.finish_reason)
                for choice in result.outputs
            ])
            for result in self.generate(prompts, params, priority=priority)
        ]

    def _image_prompt(self, ids: list[int], images: list) -> tuple[list[int], list[ImageItem]]:
        """(prompt ids with placeholders expanded, image items) for one prompt's images."""
        config = self.engine.model_config
        if not config.is_multimodal:
            raise ValueError(f"model {self.engine.model_path} is text-only ({config.architecture}); "
                             f"it cannot take images")
        if all(isinstance(image, ImageItem) for image in images):
            return ids, images
        if any(isinstance(image, ImageItem) for image in images):
            raise ValueError("give a prompt's images either all as PIL images or all as ImageItem")
        from common.image_inputs import ImageProcessor, expand_image_placeholders

        if self._image_processor is None:
            self._image_processor = ImageProcessor.from_model_dir(self.engine.model_path)
        items = self._image_processor.items(images)
        return expand_image_placeholders(ids, items, config.image_token_id), items

    def embed(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        pooling: str = DEFAULT_POOLING,
        normalize: bool = True,
    ) -> list[torch.Tensor]:
        """One float32 embedding (``[hidden]``) per prompt, in prompt order: the model's final
        hidden states (after the final norm) pooled over the prompt (``last`` token or ``mean``),
        L2-normalised unless ``normalize=False``. Text prompts are tokenized as ``generate`` does."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return list(embed_token_lists(self.engine, ids, pooling, normalize).unbind(0))

    def _apply(self, out: SequenceOutput, result: RequestOutput, choice_text: _ChoiceText) -> None:
        choice = result.outputs[out.index]
        choice.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and choice.logprobs is not None:
            choice.logprobs.extend(out.new_logprobs)
        result.num_cached_tokens = out.num_cached_tokens
        if out.cumulative_logprob is not None:
            choice.cumulative_logprob = out.cumulative_logprob
        finish = out.finish_reason
        if choice_text.push(out.new_token_ids) and finish is None:
            finish = "stop"
            self.engine.finish_sequence(out.request_id, out.index, "stop")
        if finish is not None:
            choice_text.finish()
            choice.text = choice_text.text
            choice.finish_reason = finish
