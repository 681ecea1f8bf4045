"""Causal tracing: which hidden states carry a fact to the output?

Method of Meng, Bau, Andonian & Belinkov (2022), "Locating and Editing Factual Associations in
GPT" (ROME), section 2.1 ("causal tracing of factual associations"):

1. **clean run** -- the prompt as is; record the residual stream ``h_i^(l)`` (output of decoder
   layer ``l`` at token ``i``) for every layer and position, and ``P_clean[o]``, the probability
   of the answer's first token ``o`` at the last position;
2. **corrupted run** -- add Gaussian noise ``eps ~ N(0, nu^2)`` to the input embeddings of the
   subject's tokens, ``nu = noise x`` the std of subject-token embeddings (ROME: 3x, estimated
   over the subjects of all traced facts, :func:`subject_embedding_std`), averaged over
   ``samples`` noise draws (ROME: 10); ``P_corrupt[o]`` drops;
3. **corrupted-with-restoration runs** -- the corrupted run, except that one ``h_i^(l)`` is
   overwritten with its clean value; ``P_restored(l, i)[o]`` shows how much that single state
   recovers the fact. The map ``P_restored`` over (layer, position) is :attr:`CausalTrace.probs`.

The restorations are batched and share the corrupted run's work (issue 13; same output as one
full forward per restoration, tested against that): one corrupted run per noise sample keeps its
key/value cache and the residual stream at band boundaries. A restoration whose earliest state is
at position ``i`` and layer ``l`` changes nothing before position ``i`` (causal attention) nor
below layer ``l``, so it runs only positions ``i..T-1`` on the corrupted run's cache of the
earlier positions, and skips (nnsight ``skip``) the layers below its band of
``ceil(n_layers / LAYER_BANDS)`` layers, the last skipped one returning the corrupted states.
One nnsight trace per (first position, band) group, the batch dimension enumerating that group's
(restoration, noise sample) rows (row ``r`` overwrites its own states). On SmolLM2 this is
>= 2x faster than full forwards (``tests/benchmarks/causal_trace.py``). A model whose forward
takes no key/value cache runs every row over all positions.

**Which model runs what** (``clean_model``): the *corrupted* forward, with the restorations,
always runs on ``model``; the *clean* states (and ``clean_prob``) come from ``clean_model``
(default: ``model`` itself, i.e. standard causal tracing). Passing the edited model as
``clean_model`` and the original as ``model`` asks: "which of the *edited* model's hidden states
still carry the deleted answer, as read by the original downstream computation?" -- a state the
edit failed to scrub restores ``P[o]`` although the edited model itself no longer says ``o``.
The two models must share the tokenizer and ``d_model`` (the layer counts may differ only if
``layers`` selects layers both have).

Positions can be grouped (``groups``): each group of positions is restored together, one column
per group -- for multimodal prompts (LLaVA) all image-token positions can form one column. Note
for LLaVA: image features are merged into ``inputs_embeds`` *after* the token embedding, so
corrupting image positions needs noise on the projector output, not on ``embed_tokens``; this
module corrupts token embeddings only (text prompts).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import nnsight
import torch

from .arch import get_attr_path
from .errors import InputError
from .residual import get_resid, normalize_layers
from .tokens import answer_ids, encode_ids, tokenize, tokenize_with_offsets

__all__ = ["CausalTrace", "causal_trace", "restored_probs", "subject_token_positions", "subject_embedding_std",
           "trace_input", "trace_fact", "CAUSAL_TRACE"]


#: :func:`probe.seeds.fact_seed` purpose of the causal-tracing noise (:func:`trace_fact`)
CAUSAL_TRACE = "causal-trace"


# --------------------------------------------------------------------------------------------
# subject span


def subject_token_positions(tokenizer, prompt: str, subject: str, *, occurrence: int = 0) -> list[int]:
    """Token positions of ``subject`` inside the tokenised ``prompt``.

    A token belongs to the subject when its character span overlaps the subject's character span
    (``occurrence``-th occurrence, 0 = first). Character spans come from the fast tokenizer's
    offset mapping; slow tokenizers (or offsets that are all zero) fall back to incremental
    decoding (decode ``ids[:k]`` for each k and see where the text crosses the subject's start
    and end), as ROME's ``find_token_range`` does. Positions index the ids the model reads
    (:func:`probe.tokens.tokenize`, special tokens such as a BOS included; a prompt written with
    the BOS text, ``"<bos>The ..."``, has one BOS and the same positions as the prompt without it).

    Returns:
        sorted list of token positions (non-empty).

    Raises:
        InputError: ``subject`` is empty or does not occur in ``prompt`` (``occurrence`` times).
    """
    if not isinstance(subject, str) or not subject.strip():
        raise InputError("subject is empty", field="subject")
    start = -1
    for _ in range(occurrence + 1):
        start = prompt.find(subject, start + 1)
        if start < 0:
            raise InputError(f"subject {subject!r} does not occur in the prompt {prompt!r}", field="subject")
    end = start + len(subject)
    ids, spans = tokenize_with_offsets(tokenizer, prompt)
    if spans is not None:
        pos = [i for i, (s, e) in enumerate(spans) if e > s and s < end and e > start]
    else:
        # decode the prompt's own tokens (special tokens written in it, e.g. "<bos>", keep their
        # text) and shift by the tokens the tokenizer adds in front
        raw = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        k = next((k for k in range(len(ids) - len(raw) + 1) if ids[k:k + len(raw)] == raw), None)
        if k is None:
            pos = _positions_by_decoding(tokenizer, ids, start, end)
        else:
            pos = [k + p for p in _positions_by_decoding(tokenizer, raw, start, end, skip_special_tokens=False)]
    if not pos:
        raise InputError(f"no token of the prompt covers the subject {subject!r}", field="subject")
    return pos


def _positions_by_decoding(tokenizer, ids: list[int], start: int, end: int, *,
                           skip_special_tokens: bool = True) -> list[int]:
    """Fallback span finder: the text length after decoding ``ids[:k+1]`` tells where token k ends.

    A token that ends inside a multi-byte character (the decoded prefix ends in U+FFFD) gets the
    span of the whole character, shared with the tokens that complete it.
    """
    n = len(ids)
    ends: list[int | None] = []
    for k in range(n):
        text = tokenizer.decode(ids[: k + 1], skip_special_tokens=skip_special_tokens)
        ends.append(None if text.endswith("\ufffd") else len(text))
    # token k spans (last complete end before k, next complete end at or after k]
    nxt: list[int] = [0] * n
    upcoming = ends[-1] if ends and ends[-1] is not None else 10 ** 9
    for k in range(n - 1, -1, -1):
        if ends[k] is not None:
            upcoming = ends[k]
        nxt[k] = upcoming
    pos, prev = [], 0
    for k in range(n):
        s, e = prev, nxt[k]
        if e > s and s < end and e > start:
            pos.append(k)
        if ends[k] is not None:
            prev = max(prev, ends[k])
    return pos


# --------------------------------------------------------------------------------------------
# result


@dataclass
class CausalTrace:
    """A causal-tracing map (Meng et al. 2022, section 2.1) for one prompt and answer.

    Attributes:
        probs: ``[n_layers, n_columns]`` float32 probabilities (0..1) of the answer's first token
            at the last position when the clean residual stream of ``layers[r]`` at column ``c``
            (a position, or a group of positions) is restored in the corrupted run.
        clean_prob: the answer's probability in the clean run of the model providing the clean
            states (``clean_model``).
        corrupted_prob: its probability in the corrupted run of ``model`` (no restoration),
            averaged over noise samples.
        tokens: label of each column (the token's text, or the group's name).
        subject_positions: the corrupted token positions.
        layers: decoder-layer index of each row of ``probs``.
        columns: the token positions of each column.
        answer: the answer string; answer_token: its first token's text; answer_id: its id.
        prompt: the prompt; noise: the noise multiplier; noise_std: the absolute std used
            (``noise x`` the subject-token embedding std); samples: noise samples averaged (ROME:
            10); seed: the noise seed.
    """

    probs: torch.Tensor
    clean_prob: float
    corrupted_prob: float
    tokens: list[str]
    subject_positions: list[int]
    layers: list[int]
    columns: list[list[int]]
    answer: str = ""
    answer_token: str = ""
    answer_id: int = -1
    prompt: str = ""
    noise: float = 3.0
    noise_std: float = 0.0
    samples: int = 1
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``probs - corrupted_prob`` ``[n_layers, n_columns]``: ROME's indirect effect of each
        state (probability units)."""
        return self.probs - self.corrupted_prob

    def peak(self) -> tuple[int, int]:
        """``(layer, column)`` of the largest restored probability."""
        flat = int(self.probs.argmax())
        r, c = divmod(flat, self.probs.shape[1])
        return self.layers[r], c

    def to_json(self) -> dict:
        d = asdict(self)
        d["probs"] = self.probs.tolist()
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "CausalTrace":
        d = dict(d)
        d["probs"] = torch.tensor(d["probs"], dtype=torch.float32)
        return cls(**d)


# --------------------------------------------------------------------------------------------
# core


def _embedding_std(model, ids: Sequence[int]) -> float:
    """Std over all elements of the ``[len(ids), d_model]`` input embeddings of ``ids``: the
    embedding module's output, so a scale it applies (Gemma's ``sqrt(d_model)``) is included."""
    emb = get_attr_path(model.hf, model.arch.embed)
    with torch.no_grad():
        x = emb(torch.as_tensor(list(ids), dtype=torch.long, device=emb.weight.device)[None])
    return float(x.double().std())


def trace_input(fact) -> tuple[str, str, str]:
    """What causal tracing of ``fact`` corrupts (ROME, section 2.1: always the subject).

    A text fact: its prompt and ``subject``. An image fact: its text form
    (:func:`probe.images.text_form`; image tokens come from the projector, not the token
    embeddings) and its ``entity`` as the subject.

    Returns:
        ``(prompt, subject, corrupted)``: the text traced, the substring corrupted, and a label
        for the record (``"subject"``, or ``"entity 'France' in the text form ..."``).

    Raises:
        InputError: (naming the fact's file, line and field ``subject``, or ``entity`` for an
        image fact) the fact has no subject, or it does not occur in the traced text.
    """
    from .images import text_form

    file, line = fact.where()
    form = text_form(fact)
    if form is not None:
        entity = getattr(fact, "entity", None)
        if not entity or entity not in form:
            why = "has no entity" if not entity else f"names its entity {entity!r} nowhere in its text form {form!r}"
            raise InputError(f"image fact {fact.id!r} {why}: causal tracing corrupts the entity's tokens in the "
                             "text form (ROME, section 2.1)", file=file, line=line, field="entity")
        return form, entity, f"entity {entity!r} in the text form (image facts are traced without the image)"
    if not isinstance(fact.subject, str) or not fact.subject.strip():
        raise InputError(f"fact {fact.id!r} has no subject: causal tracing corrupts the subject's tokens (ROME, "
                         "section 2.1); give every traced fact a subject, or trace none (--causal-traces 0)",
                         file=file, line=line, field="subject")
    if fact.subject not in fact.prompt:
        raise InputError(f"subject {fact.subject!r} of fact {fact.id!r} does not occur in its prompt",
                         file=file, line=line, field="subject")
    return fact.prompt, fact.subject, "subject"


def subject_embedding_std(model, facts_or_subjects) -> float:
    """Std of the input embeddings of subject tokens (ROME, section 2.1 and its
    ``collect_embedding_std``): the unit of the causal-tracing noise, ``nu = noise x`` this
    (ROME: ``noise = 3``). The factor is *not* included.

    Args:
        model: the :class:`~probe.model.ProbeModel`.
        facts_or_subjects: :class:`~probe.facts.Fact` s -- each contributes the tokens corrupted
            when it is traced (its subject's tokens inside its prompt, :func:`trace_input`) -- or
            subject strings, each tokenised alone without special tokens (as ROME does).

    Returns:
        the std over all elements of the ``[n_subject_tokens, d_model]`` embeddings (embedding
        units, the embedding module's output: Gemma's ``sqrt(d_model)`` scale included).

    Raises:
        InputError: a fact without a subject (see :func:`trace_input`); no subject tokens at all.
    """
    tok = model.tokenizer
    ids: list[int] = []
    for item in facts_or_subjects:
        if isinstance(item, str):
            ids += list(tok(item, add_special_tokens=False)["input_ids"])
        else:
            prompt, subject, _ = trace_input(item)
            row = tokenize(tok, prompt)
            ids += [row[p] for p in subject_token_positions(tok, prompt, subject)]
    if not ids:
        raise InputError("no subject tokens to estimate the causal-tracing noise from", field="subject")
    return _embedding_std(model, ids)


def _clean_run(model, ids: list[int], layers: list[int], answer_id: int) -> tuple[torch.Tensor, float]:
    """Clean residual stream ``[n_layers, T, d]`` (model dtype) and the answer's probability."""
    batch = encode_ids(model, [ids])
    with torch.no_grad(), model.nn.trace(**batch.model_inputs(), logits_to_keep=1):
        states = nnsight.save([get_resid(model.layer_envoy(layer).output, 1)[0].to(model.device) for layer in layers])
        logits = model.nn.output.logits[0, -1].save()
    prob = torch.softmax(logits.float(), -1)[answer_id]
    return torch.stack(list(states), 0), float(prob)


def _check_restorations(restorations, corrupt_positions, state_layers, row_of: dict[int, int],
                        T: int) -> list[int]:
    """Validate the restoration sets and corrupted positions; the sorted unique corrupted positions.

    Raises KeyError for a layer without a clean state, IndexError for a position outside ``[0, T)``.
    """
    for rs in restorations:
        for layer, pos in rs:
            if layer not in row_of:
                raise KeyError(f"layer {layer} has no clean state (clean states for {list(state_layers)})")
            if not 0 <= pos < T:
                raise IndexError(f"position {pos} outside the prompt's {T} tokens")
    corrupt = sorted(set(int(p) for p in corrupt_positions))
    if any(not 0 <= p < T for p in corrupt):
        raise IndexError(f"corrupted positions {corrupt} outside the prompt's {T} tokens")
    return corrupt


#: the restorations are grouped into this many bands of layers (see :func:`restored_probs`)
LAYER_BANDS = 6


def _cache_kwarg(model) -> str | None:
    """Name of the forward argument taking a key/value cache (``cache`` in transformers 5,
    ``past_key_values`` before); None when the model takes none."""
    params = inspect.signature(model.hf.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _corrupted_run(model, ids, corrupt, noise, noise_std, answer_id, save_layers, cache_kw):
    """The corrupted forward of every noise sample (``[S]`` rows): the answer's probability per
    sample (float64 ``[S]``, cpu), the residual stream of ``save_layers`` (``{layer: [S, T, d]}``)
    and the key/value cache (None when ``cache_kw`` is None or the model returns none)."""
    S = noise.shape[0]
    batch = encode_ids(model, [ids] * S)
    embed = get_attr_path(model.nn, model.arch.embed)
    kw = {"use_cache": True} if cache_kw else {}
    out = None
    with torch.no_grad(), model.nn.trace(**batch.model_inputs(), logits_to_keep=1, **kw):
        if corrupt and noise_std > 0:
            emb = embed.output
            emb[:, corrupt] += noise.to(device=emb.device, dtype=emb.dtype)
        states = nnsight.save({layer: get_resid(model.layer_envoy(layer).output, S).clone() for layer in save_layers})
        logits = model.nn.output.logits[:, -1].save()
        if cache_kw:
            out = model.nn.output.save()
    cache = None
    if out is not None:
        cache = next((getattr(out, k, None) for k in ("cache", "past_key_values") if getattr(out, k, None) is not None),
                     None)
        if cache is not None and not _croppable(cache):
            cache = None
    return torch.softmax(logits.float(), -1)[:, answer_id].double().cpu(), dict(states), cache


def _croppable(cache) -> bool:
    """Whether a copy of ``cache`` can be cut back to an earlier position (``crop``) and re-batched
    (``reorder_cache``). A sliding-window layer that has seen its whole window, or a
    linear-attention layer, cannot: causal tracing then runs every row over all positions."""
    if not (hasattr(cache, "crop") and hasattr(cache, "reorder_cache")) or not getattr(cache, "is_croppable", True):
        return False
    try:
        copy.deepcopy(cache).crop(-1)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError):
        return False
    return True


def _run_group(model, ids, answer_id, rows, restorations, start, band_start, corrupt, noise, noise_std, corrupted,
               cache, cache_kw, clean_states, row_of) -> torch.Tensor:
    """One nnsight trace of ``rows`` (``(restoration, sample)`` pairs) whose restorations all
    start at position ``start`` or later and at layer ``band_start`` or later.

    Positions before ``start`` are those of the corrupted run at every layer (causal attention),
    so only ``ids[start:]`` runs, on the corrupted run's key/value cache of the earlier positions;
    layers before ``band_start`` are those of the corrupted run at every position, so they are
    skipped (nnsight ``skip``), layer ``band_start - 1`` returning the corrupted states. The
    answer's probability per row (float64 ``[len(rows)]``, cpu)."""
    T = len(ids)
    B = len(rows)
    dev = model.device
    samples = torch.tensor([s for _, s in rows])
    n = T - start
    inputs = {"input_ids": torch.tensor([ids[start:]] * B, device=dev),
              "attention_mask": torch.ones(B, T, dtype=torch.long, device=dev),
              "position_ids": torch.arange(start, T, device=dev)[None].expand(B, n)}
    kw = {}
    if start > 0:
        past = copy.deepcopy(cache)
        past.crop(start - T)
        past.reorder_cache(samples.to(dev))
        kw = {cache_kw: past, "use_cache": True}
    elif cache_kw:
        kw = {"use_cache": False}
    # per layer: the (rows, local positions, clean positions) to restore
    plan: dict[int, tuple[list[int], list[int]]] = {}
    for b, (r, _) in enumerate(rows):
        for layer, pos in restorations[r]:
            plan.setdefault(layer, ([], []))
            plan[layer][0].append(b)
            plan[layer][1].append(pos)
    local = [(k, p - start) for k, p in enumerate(corrupt) if p >= start]
    with torch.no_grad(), model.nn.trace(**inputs, logits_to_keep=1, **kw):
        if band_start == 0:
            if local and noise_std > 0:
                emb = get_attr_path(model.nn, model.arch.embed).output
                eps = noise[samples][:, [k for k, _ in local]]
                emb[:, [p for _, p in local]] += eps.to(device=emb.device, dtype=emb.dtype)
        else:
            skipped = corrupted[band_start - 1][samples.to(corrupted[band_start - 1].device), start:]
            for layer in range(band_start):
                model.layer_envoy(layer).skip(skipped)
        for layer in sorted(plan):
            b_rows, pos = plan[layer]
            h = get_resid(model.layer_envoy(layer).output, B)
            h[torch.tensor(b_rows, device=h.device), torch.tensor(pos, device=h.device) - start] = \
                clean_states[row_of[layer]][pos].to(device=h.device, dtype=h.dtype)
        logits = model.nn.output.logits[:, -1].save()
    return torch.softmax(logits.float(), -1)[:, answer_id].double().cpu()


def restored_probs(model, ids: Sequence[int], answer_id: int, corrupt_positions: Sequence[int],
                   restorations: Sequence[Sequence[tuple[int, int]]], *, clean_states: torch.Tensor,
                   state_layers: Sequence[int], noise_std: float, samples: int = 1, seed: int = 0,
                   batch_size: int = 128) -> torch.Tensor:
    """Probability of ``answer_id`` at the last position for each restoration set (batched).

    Every row runs the prompt ``ids`` on ``model`` with seeded Gaussian noise (std ``noise_std``)
    added to the token embeddings at ``corrupt_positions`` (the same noise for every row of a
    noise sample), then overwrites the residual stream (output of decoder layer ``l``) at
    position ``i`` with ``clean_states`` for every ``(l, i)`` of its restoration set. An empty set
    is the plain corrupted run; the set of *all* (layer, position) pairs -- or just all positions
    of any one layer -- reproduces the clean run (causal attention: later layers only read that
    layer's states).

    Args:
        model: the :class:`~probe.model.ProbeModel` running the corrupted forward.
        ids: ``[T]`` token ids of the prompt (as :func:`probe.tokens.tokenize` gives).
        answer_id: the token whose probability is measured.
        corrupt_positions: token positions whose input embeddings get noise.
        restorations: list of restoration sets, each a list of ``(layer, position)`` pairs.
        clean_states: ``[len(state_layers), T, d_model]`` clean residual stream.
        state_layers: decoder-layer index of each row of ``clean_states``.
        noise_std: absolute noise std (embedding units); 0 = no corruption.
        samples: noise samples; the result is the mean probability over samples.
        seed: seeds the noise (``torch.Generator``): same seed, same noise.
        batch_size: rows (restorations x samples) per nnsight trace.

    Returns:
        float32 ``[len(restorations)]`` probabilities (0..1).

    Raises:
        KeyError: a restoration names a layer not in ``state_layers``; IndexError: a position
        outside ``[0, T)``.
    """
    ids = list(ids)
    T = len(ids)
    row_of = {layer: r for r, layer in enumerate(state_layers)}
    corrupt = _check_restorations(restorations, corrupt_positions, state_layers, row_of, T)
    d = clean_states.shape[-1]
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(samples, len(corrupt), d, generator=gen) * float(noise_std)  # [S, n_corrupt, d]
    width = max(1, -(-model.n_layers // LAYER_BANDS))

    def band(rs) -> int:
        return min(layer for layer, _ in rs) // width * width

    save = sorted({band(rs) - 1 for rs in restorations if rs and band(rs) > 0})
    cache_kw = _cache_kwarg(model)
    base, corrupted, cache = _corrupted_run(model, ids, corrupt, noise, noise_std, answer_id, save, cache_kw)
    out = torch.zeros(len(restorations), dtype=torch.float64)
    groups: dict[tuple[int, int], list[int]] = {}
    for r, rs in enumerate(restorations):
        if not rs:
            out[r] = base.sum()
            continue
        start = min(p for _, p in rs) if cache is not None else 0
        groups.setdefault((start, band(rs)), []).append(r)
    for (start, band_start), members in sorted(groups.items()):
        jobs = [(r, s) for r in members for s in range(samples)]
        for k in range(0, len(jobs), batch_size):
            rows = jobs[k:k + batch_size]
            p = _run_group(model, ids, answer_id, rows, restorations, start, band_start, corrupt, noise, noise_std,
                           corrupted, cache, cache_kw, clean_states, row_of)
            for b, (r, _) in enumerate(rows):
                out[r] += p[b]
    return (out / samples).float()


def _columns(T: int, groups) -> tuple[list[list[int]], list[str] | None]:
    if groups is None:
        return [[i] for i in range(T)], None
    if isinstance(groups, Mapping):
        names, cols = list(groups.keys()), [list(v) for v in groups.values()]
    else:
        cols, names = [list(g) for g in groups], None
    for c in cols:
        if not c:
            raise ValueError("empty position group")
        for p in c:
            if not -T <= int(p) < T:
                raise IndexError(f"position {p} outside the prompt's {T} tokens")
    return [[int(p) % T for p in c] for c in cols], names


def _trace_prompt_ids(model, clean_model, prompt, subject, subject_positions) -> list[int]:
    """Check the arguments of :func:`causal_trace` and tokenise ``prompt`` (the same for both models)."""
    from .images import ImagePrompt

    if isinstance(prompt, ImagePrompt):
        raise InputError("causal tracing corrupts token embeddings; an image prompt's image tokens come from the "
                         "projector, so trace the fact's text form instead (probe.images.text_form)",
                         field="prompt")
    if clean_model.d_model != model.d_model:
        raise ValueError(f"clean_model has d_model {clean_model.d_model}, model {model.d_model}")
    if (subject is None) == (subject_positions is None):
        raise InputError("give exactly one of subject and subject_positions", field="subject")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt is empty or whitespace-only", field="prompt")
    ids = tokenize(model.tokenizer, prompt)
    if clean_model is not model and tokenize(clean_model.tokenizer, prompt) != ids:
        raise ValueError("model and clean_model tokenise the prompt differently")
    return ids


def _corrupt_positions(model, prompt: str, subject, subject_positions, T: int) -> list[int]:
    """Sorted token positions to corrupt: the subject's tokens, or the explicit positions mod ``T``."""
    if subject is not None:
        return subject_token_positions(model.tokenizer, prompt, subject)
    corrupt = []
    for p in subject_positions:
        if not -T <= int(p) < T:
            raise IndexError(f"subject position {p} outside the prompt's {T} tokens")
        corrupt.append(int(p) % T)
    corrupt = sorted(set(corrupt))
    if not corrupt:
        raise InputError("subject_positions is empty", field="subject_positions")
    return corrupt


def _trace_probs(model, clean_model, ids, a_id, corrupt, restorations, clean_states, layer_list, std, samples,
                 seed, batch_size) -> torch.Tensor:
    """Restored probability of every restoration set (``[len(restorations)]``; row 0 = corrupted run).

    Restorations known to change nothing are not run (their value is the corrupted probability):
    the last layer's states at positions other than the last never reach the output, and, when
    the clean states come from `model` itself, positions before the first corrupted token are
    identical in the clean and the corrupted run.
    """
    T = len(ids)
    first = min(corrupt)
    last_layer = model.n_layers - 1

    def _noop(rs) -> bool:
        return bool(rs) and all((layer == last_layer and p != T - 1) or (clean_model is model and p < first)
                                for layer, p in rs)

    todo = [i for i, rs in enumerate(restorations) if i == 0 or not _noop(rs)]
    run = restored_probs(model, ids, a_id, corrupt, [restorations[i] for i in todo], clean_states=clean_states,
                         state_layers=layer_list, noise_std=std, samples=samples, seed=seed, batch_size=batch_size)
    probs = torch.full((len(restorations),), float(run[0]))
    probs[todo] = run
    return probs


def causal_trace(model, prompt: str, answer: str, *, subject: str | None = None,
                 subject_positions: Sequence[int] | None = None, noise: float = 3.0, samples: int = 10,
                 embedding_std: float | None = None, seed: int = 0, clean_model=None, layers: int | Sequence[int] | None = None,
                 groups: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None,
                 batch_size: int = 128) -> CausalTrace:
    """Causal-tracing map of ``answer`` over (layer, token position) (ROME, section 2.1).

    Args:
        model: the :class:`~probe.model.ProbeModel` that runs the corrupted forward (with the
            restorations).
        prompt: the prompt (its last token predicts the answer).
        answer: the answer; its first token (taken in context, :func:`probe.answer_ids`) is
            measured.
        subject: the subject, a substring of ``prompt``; its tokens are corrupted
            (:func:`subject_token_positions`).
        subject_positions: explicit token positions to corrupt instead (negative allowed),
            e.g. image tokens; exactly one of ``subject`` / ``subject_positions``.
        noise: noise std as a multiple of ``embedding_std`` (ROME: 3).
        samples: noise samples averaged (ROME: 10); seeded by ``seed``.
        embedding_std: the std the noise multiplies (embedding units). ROME takes the std of the
            subject-token embeddings over all traced facts (:func:`subject_embedding_std`); pass
            that when tracing many facts. None = the std of this prompt's corrupted tokens'
            embeddings.
        clean_model: the model whose clean run provides the restored states and
            ``clean_prob`` (default ``model``). See the module docstring.
        layers: decoder layers to restore (rows of the map); None = all.
        groups: restore positions together: a list of position lists, or ``{name: positions}``
            (one column each). Default: one column per token position.
        batch_size: restorations per nnsight trace.

    Returns:
        :class:`CausalTrace` with ``probs [n_layers, n_columns]`` (probabilities 0..1).

    Raises:
        InputError: bad prompt/answer/subject, or both/neither of ``subject`` and
        ``subject_positions``. ValueError: the two models' widths differ. IndexError: a layer
        or position out of range.

    Example::

        tr = causal_trace(model, "The Eiffel Tower is located in the city of", "Paris",
                          subject="The Eiffel Tower")
        tr.probs.shape  # [30, 10]
    """
    clean_model = model if clean_model is None else clean_model
    ids = _trace_prompt_ids(model, clean_model, prompt, subject, subject_positions)
    T = len(ids)
    corrupt = _corrupt_positions(model, prompt, subject, subject_positions, T)
    a_id = answer_ids(model.tokenizer, prompt, answer)[0]
    layer_list = normalize_layers(model, layers)
    normalize_layers(clean_model, layer_list)  # same indices must exist in the clean model
    cols, names = _columns(T, groups)
    clean_states, clean_prob = _clean_run(clean_model, ids, layer_list, a_id)
    base = _embedding_std(model, [ids[p] for p in corrupt]) if embedding_std is None else float(embedding_std)
    std = noise * base
    restorations = [[]] + [[(layer, p) for p in c] for layer in layer_list for c in cols]
    probs = _trace_probs(model, clean_model, ids, a_id, corrupt, restorations, clean_states, layer_list, std,
                         samples, seed, batch_size)
    tok = model.tokenizer
    labels = names or [tok.decode([ids[c[0]]]) if len(c) == 1 else f"{c[0]}..{c[-1]}" for c in cols]
    return CausalTrace(
        probs=probs[1:].reshape(len(layer_list), len(cols)), clean_prob=clean_prob, corrupted_prob=float(probs[0]),
        tokens=[str(x) for x in labels], subject_positions=corrupt, layers=layer_list, columns=cols,
        answer=answer.strip(), answer_token=tok.decode([a_id]), answer_id=int(a_id), prompt=prompt, noise=float(noise),
        noise_std=float(std), samples=int(samples), seed=int(seed),
        meta={"same_model": clean_model is model, "model": getattr(model, "name", ""),
              "clean_model": getattr(clean_model, "name", "")})


# --------------------------------------------------------------------------------------------
# one fact of a run


def trace_fact(model, edited, fact, embedding_std: float, *, noise: float = 3.0, samples: int = 10,
               seed: int = 0, batch_size: int = 128) -> dict:
    """Causal traces of one deleted fact with the unedited and with the edited model as the clean
    run (ROME, section 2.1; see the module docstring): the record of ``causal_traces.jsonl``.

    Both traces corrupt the subject (:func:`trace_input`; an image fact: its entity in its text
    form) with the same noise: ``samples`` draws of std ``noise x embedding_std``, seeded by
    :func:`probe.seeds.fact_seed` ``(seed, CAUSAL_TRACE, fact.id)``.

    Args:
        model: the unedited :class:`~probe.model.ProbeModel` (runs every corrupted forward).
        edited: the edited model (its clean states are restored in the ``post`` trace).
        fact: the :class:`~probe.facts.Fact`.
        embedding_std: subject-token embedding std over the run's facts
            (:func:`subject_embedding_std`, computed once).
        noise, samples: ROME's 3 and 10. seed: the run seed. batch_size: rows per forward.

    Returns:
        ``{"fact_id", "corrupted", "subject", "pre", "post"}``; ``pre``/``post`` are
        :meth:`CausalTrace.to_json` dicts (``probs [n_layers][n_tokens]``).

    Raises:
        InputError: the fact has no subject (file, line, field ``subject``; see :func:`trace_input`).
    """
    from .seeds import fact_seed

    prompt, subject, corrupted = trace_input(fact)
    kw = {"subject": subject, "noise": noise, "samples": samples, "embedding_std": embedding_std,
          "seed": fact_seed(seed, CAUSAL_TRACE, fact.id), "batch_size": batch_size}
    pre = causal_trace(model, prompt, fact.answer, **kw)
    post = causal_trace(model, prompt, fact.answer, clean_model=edited, **kw)
    return {"fact_id": fact.id, "corrupted": corrupted, "subject": subject, "pre": pre.to_json(),
            "post": post.to_json()}
