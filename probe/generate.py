"""Text generation: left-padded, batched ``generate`` with image prompts, greedy or sampling.

The one place that calls Hugging Face ``generate``: the sampling attacks
(:mod:`attacks.blackbox`) and the accuracy metrics (:mod:`defenses.metrics`) both go through
:func:`generate` with an explicit :class:`Decoding`.

Prompts are left-padded (:func:`probe.tokens.encode`) with an attention mask; image prompts
(:class:`probe.images.ImagePrompt`) are generated with their images (``pixel_values``). The
prompt is stripped by slicing off the padded prompt columns, and each continuation is decoded
with special tokens (EOS, padding) removed.

Two decodings exist, kept bit-identical to what each caller did before this module:

* ``Decoding(model_defaults=False)`` (the attacks): every decoding setting is explicit
  (``transformers.GenerationConfig`` built from the :class:`Decoding`: no repetition penalty,
  no n-gram blocking, the model's EOS), ``position_ids = cumsum(mask) - 1`` passed so that
  absolute-position models (GPT-2) continue a padded prompt exactly as an unpadded one, the
  prompt-length check against the context window, under ``torch.inference_mode``.
* ``Decoding(model_defaults=True)`` (the accuracy metrics: greedy only): the model's own
  ``generation_config`` with ``max_new_tokens``, ``do_sample=False`` and the pad token
  overridden, positions computed by ``generate`` from the mask, under ``torch.no_grad``.

Sampling runs inside :func:`torch.random.fork_rng` under ``torch.manual_seed(seed)`` when a seed
is given: the global RNG state is never consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PromptTooLongError
from .tokens import encode, pad_id


@dataclass(frozen=True)
class Decoding:
    """How to decode.

    Attributes:
        max_new_tokens: tokens generated per continuation (>= 1).
        samples: continuations per prompt (``num_return_sequences``; >= 1; 1 when greedy).
        do_sample: ancestral sampling (True) or greedy decoding (False; temperature/top-p/top-k
            are then ignored).
        temperature, top_p, top_k: sampling parameters (``top_k=0``: no top-k truncation).
        seed: sampling runs under ``torch.manual_seed(seed)`` inside ``fork_rng`` (None: the
            forked global state).
        model_defaults: use the model's own generation config (greedy accuracy metrics; see the
            module docstring) instead of explicit settings.
    """

    max_new_tokens: int = 36
    samples: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    model_defaults: bool = False


def _fork_devices(device: torch.device) -> list:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def eos_id(model):
    """The EOS token id generation stops at: the model's generation config's, else the tokenizer's."""
    gc = getattr(model.hf, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
    return eos


def _hf_config(model, dec: Decoding):
    from transformers import GenerationConfig

    cfg = dict(max_new_tokens=dec.max_new_tokens, min_new_tokens=0, num_return_sequences=dec.samples, num_beams=1,
               do_sample=dec.do_sample, pad_token_id=pad_id(model.tokenizer), eos_token_id=eos_id(model),
               repetition_penalty=1.0, no_repeat_ngram_size=0)
    if dec.do_sample:
        cfg.update(temperature=float(dec.temperature), top_p=float(dec.top_p), top_k=int(dec.top_k))
    return GenerationConfig(**cfg)


def _generate_batch(model, prompts: list, dec: Decoding) -> list[str]:
    batch = encode(model, prompts)
    tok = model.tokenizer
    extra = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values}
    if dec.model_defaults:
        with torch.no_grad():
            out = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    max_new_tokens=dec.max_new_tokens, do_sample=False,
                                    pad_token_id=pad_id(tok), **extra)
        return tok.batch_decode(out[:, batch.seq_len:], skip_special_tokens=True)
    limit = model.context_length
    if limit is not None and batch.seq_len + dec.max_new_tokens > limit:
        longest = int(batch.lengths.max())
        raise PromptTooLongError(f"a prompt of {longest} tokens plus {dec.max_new_tokens} new tokens exceeds the "
                                 f"model's context of {limit}", field="prompt")
    gen_cfg = _hf_config(model, dec)
    with torch.random.fork_rng(devices=_fork_devices(batch.input_ids.device)):
        if dec.seed is not None:
            torch.manual_seed(dec.seed)
        with torch.inference_mode():
            out = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, generation_config=gen_cfg, **extra)
    return tok.batch_decode(out[:, batch.seq_len:], skip_special_tokens=True)


def generate(model, prompts: Sequence, decoding: Decoding, *, batch_size: int | None = None) -> list[list[str]]:
    """Continuations of each prompt: ``[len(prompts)][decoding.samples]`` decoded strings.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        prompts: non-empty prompts (strings or image prompts).
        decoding: the :class:`Decoding`.
        batch_size: prompts per ``generate`` call (None: all in one call). With a seed, every
            batch starts from the same seed.

    Raises:
        InputError: an empty prompt.
        PromptTooLongError: a prompt plus ``max_new_tokens`` exceeds the model's context window
            (explicit decoding).
        ValueError: ``samples < 1`` or ``max_new_tokens < 1``, or ``samples > 1`` with
            ``model_defaults``.
    """
    if decoding.samples < 1 or decoding.max_new_tokens < 1:
        raise ValueError("samples and max_new_tokens must be >= 1")
    if decoding.model_defaults and (decoding.samples != 1 or decoding.do_sample):
        raise ValueError("model_defaults decoding is greedy with one continuation per prompt")
    prompts = list(prompts)
    step = len(prompts) if batch_size is None else batch_size
    texts: list[str] = []
    for start in range(0, len(prompts), max(1, step)):
        texts.extend(_generate_batch(model, prompts[start:start + step], decoding))
    n = decoding.samples
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def greedy_texts(model, prompts: Sequence, *, max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy continuations (one string per prompt) with the model's own generation defaults, in
    batches of ``batch_size`` (the accuracy metrics' decoding)."""
    rows = generate(model, prompts, Decoding(max_new_tokens=max_new_tokens, model_defaults=True),
                    batch_size=batch_size)
    return [r[0] for r in rows]
