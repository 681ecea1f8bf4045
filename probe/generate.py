"""Text generation: left-padded, batched ``generate`` with image prompts, greedy or sampling.

The one place that calls Hugging Face ``generate``: the sampling attacks
(:mod:`attacks.blackbox`) and the accuracy metrics (:mod:`defenses.metrics`, greedy) both go
through :func:`generate` with an explicit :class:`Decoding`.

Prompts are left-padded (:func:`probe.tokens.encode`) with an attention mask and
``position_ids = cumsum(mask) - 1`` (so absolute-position models such as GPT-2 continue a padded
prompt exactly as an unpadded one); image prompts (:class:`probe.images.ImagePrompt`) are
generated with their images (``pixel_values``). The prompt is stripped by slicing off the padded
prompt columns, and each continuation is decoded with special tokens (EOS, padding) removed. A
prompt plus ``max_new_tokens`` longer than the model's context window is refused.

**The decoding is exactly the** :class:`Decoding` **, whatever the model ships.** Hugging Face's
``generate`` fills every field left unset (``None``) in the config it is given from the model's
own ``generation_config`` (``generation_config.json``: e.g. ``min_p``, ``typical_p``,
``repetition_penalty``, ``suppress_tokens``, ``top_k=64``), and the rest from its global defaults
(``top_k=50``). So the config is built from scratch (:func:`plain_generation_config`: only the
BOS/EOS/pad ids are taken from the model, every penalty and truncation field set to its neutral
value) and, for the duration of the call, the model's ``generation_config`` is replaced by one
that holds only those ids; nothing else can leak in. Greedy decoding
(``do_sample=False``, the accuracy metrics) is immune in the same way: no repetition penalty, no
n-gram blocking, no suppressed or forced tokens, no minimum length.

Sampling runs inside :func:`torch.random.fork_rng` under ``torch.manual_seed(seed)`` when a seed
is given: the global RNG state is never consumed.
"""

from __future__ import annotations

from contextlib import contextmanager
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
        samples: continuations per prompt (``num_return_sequences``; >= 1).
        do_sample: ancestral sampling (True) or greedy decoding (False; temperature/top-p/top-k
            are then ignored).
        temperature, top_p, top_k: sampling parameters (``top_k=0``: no top-k truncation).
        seed: sampling runs under ``torch.manual_seed(seed)`` inside ``fork_rng`` (None: the
            forked global state).
    """

    max_new_tokens: int = 36
    samples: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


#: Neutral values of every ``transformers.GenerationConfig`` penalty / length / beam field that is
#: "off" at a value other than None (greedy and sampling). Fields that are off at None stay None:
#: ``min_p``, ``min_new_tokens`` (0 would still add a no-op length processor), ``bad_words_ids``,
#: ``suppress_tokens``, ``begin_suppress_tokens``, ``forced_bos_token_id``, ``forced_eos_token_id``,
#: ``sequence_bias``, ``exponential_decay_length_penalty``, ``guidance_scale``,
#: ``watermarking_config``, ``stop_strings``, ``top_h``, ``penalty_alpha``, ``dola_layers``,
#: assisted decoding, ...; the model's generation config that would fill them is swapped out
#: during the call (module docstring).
NEUTRAL_GENERATION: dict = dict(
    num_beams=1, min_length=0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0, early_stopping=False,
    renormalize_logits=False, remove_invalid_values=False, output_scores=False, output_logits=False,
    return_dict_in_generate=False, use_cache=True)

#: Sampling fields at plain ancestral sampling (no truncation); temperature/top-p/top-k come from
#: the :class:`Decoding`.
PLAIN_SAMPLING: dict = dict(typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


def _fork_devices(device: torch.device) -> list:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def eos_id(model):
    """The EOS token id(s) generation stops at: the model's generation config's, else the tokenizer's."""
    gc = getattr(model.hf, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None:
        eos = getattr(model.tokenizer, "eos_token_id", None)
    return eos


def _special_ids(model) -> dict:
    gc = getattr(model.hf, "generation_config", None)
    bos = getattr(gc, "bos_token_id", None) if gc is not None else None
    if bos is None:
        bos = getattr(model.tokenizer, "bos_token_id", None)
    return dict(bos_token_id=bos, eos_token_id=eos_id(model), pad_token_id=pad_id(model.tokenizer))


def plain_generation_config(model, dec: Decoding):
    """A ``transformers.GenerationConfig`` built from scratch for ``dec``: the model's BOS/EOS/pad
    ids, :data:`NEUTRAL_GENERATION`, and for sampling :data:`PLAIN_SAMPLING` plus the
    :class:`Decoding`'s temperature/top-p/top-k. Nothing is read from the model's own generation
    config except those ids."""
    from transformers import GenerationConfig

    cfg = dict(NEUTRAL_GENERATION, **_special_ids(model), max_new_tokens=dec.max_new_tokens,
               num_return_sequences=dec.samples, do_sample=dec.do_sample)
    if dec.do_sample:
        cfg.update(PLAIN_SAMPLING, temperature=float(dec.temperature), top_p=float(dec.top_p), top_k=int(dec.top_k))
    return GenerationConfig(**cfg)


@contextmanager
def _only_special_ids(model):
    """Replace ``model.hf.generation_config`` by one holding only the BOS/EOS/pad ids while
    ``generate`` runs (it fills unset fields of the given config from it); restored afterwards."""
    from transformers import GenerationConfig

    hf = model.hf
    saved = hf.generation_config
    hf.generation_config = GenerationConfig(**_special_ids(model))
    try:
        yield
    finally:
        hf.generation_config = saved


def _generate_batch(model, prompts: list, dec: Decoding) -> list[str]:
    batch = encode(model, prompts)
    extra = {} if batch.pixel_values is None else {"pixel_values": batch.pixel_values}
    limit = model.context_length
    if limit is not None and batch.seq_len + dec.max_new_tokens > limit:
        longest = int(batch.lengths.max())
        raise PromptTooLongError(f"a prompt of {longest} tokens plus {dec.max_new_tokens} new tokens exceeds the "
                                 f"model's context of {limit}", field="prompt")
    gen_cfg = plain_generation_config(model, dec)
    with torch.random.fork_rng(devices=_fork_devices(batch.input_ids.device)), _only_special_ids(model):
        if dec.seed is not None:
            torch.manual_seed(dec.seed)
        with torch.inference_mode():
            out = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, generation_config=gen_cfg, **extra)
    return model.tokenizer.batch_decode(out[:, batch.seq_len:], skip_special_tokens=True)


def generate(model, prompts: Sequence, decoding: Decoding, *, batch_size: int | None = None) -> list[list[str]]:
    """Continuations of each prompt: ``[len(prompts)][decoding.samples]`` decoded strings.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        prompts: non-empty prompts (strings or image prompts).
        decoding: the :class:`Decoding` (the only decoding settings used; module docstring).
        batch_size: prompts per ``generate`` call (None: all in one call). With a seed, every
            batch starts from the same seed.

    Raises:
        InputError: an empty prompt.
        PromptTooLongError: a prompt plus ``max_new_tokens`` exceeds the model's context window.
        ValueError: ``samples < 1`` or ``max_new_tokens < 1``.
    """
    if decoding.samples < 1 or decoding.max_new_tokens < 1:
        raise ValueError("samples and max_new_tokens must be >= 1")
    prompts = list(prompts)
    step = len(prompts) if batch_size is None else batch_size
    texts: list[str] = []
    for start in range(0, len(prompts), max(1, step)):
        texts.extend(_generate_batch(model, prompts[start:start + step], decoding))
    n = decoding.samples
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def greedy_texts(model, prompts: Sequence, *, max_new_tokens: int = 8, batch_size: int = 16) -> list[str]:
    """Greedy continuations (one string per prompt), in batches of ``batch_size`` (the accuracy
    metrics' decoding; no penalty or constraint from the model's generation config applies).

    Raises:
        PromptTooLongError: a prompt plus ``max_new_tokens`` exceeds the model's context window.
    """
    rows = generate(model, prompts, Decoding(max_new_tokens=max_new_tokens), batch_size=batch_size)
    return [r[0] for r in rows]
