"""The layer-wise lens sweep: where is the answer decodable, and how well does the model say it?

:func:`lens_readout` runs one nnsight trace per batch over ``prompt + answer`` (teacher forcing),
reads the residual stream of every layer at the last prompt token, decodes it with the logit lens
(fp32, one stacked unembedding matmul) and reduces it at once to per-layer answer ranks and
probabilities, plus any extra per-fact scores (the whitebox attacks plug in here), so nothing of
size ``layers x vocab`` outlives its batch.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from .interrupt import check as check_interrupt
from .lens import LogitLens
from .residual import gather_resid, get_resid
from .results import LayerReadout
from .tokens import answer_ids as _answer_ids
from .tokens import encode_ids, tokenize


class LensBatch:
    """One batch of logit-lens outputs, shared by every scorer so common work is done once.

    Attributes:
        logits: ``[batch, n_layers, vocab]`` fp32 lens logits of every layer.
        answer: ``[batch]`` first-token ids of the answers.
    """

    def __init__(self, logits: torch.Tensor, answer: torch.Tensor, lse: torch.Tensor | None = None):
        self.logits = logits
        self.answer = answer
        self._lse: torch.Tensor | None = lse
        self._ranks: torch.Tensor | None = None
        self._probs: dict[int, torch.Tensor] = {}

    @property
    def ranks(self) -> torch.Tensor:
        """``[batch, n_layers]`` 1-based rank of the answer at every layer (computed once)."""
        if self._ranks is None:
            self._ranks = answer_rank(self.logits, self.answer[:, None].expand(-1, self.logits.shape[1]))
        return self._ranks

    @property
    def lse(self) -> torch.Tensor:
        """``[batch, n_layers, 1]`` logsumexp of the lens logits (computed once)."""
        if self._lse is None:
            self._lse = torch.logsumexp(self.logits, -1, keepdim=True)
        return self._lse

    def probs(self, layers: Sequence[int]) -> torch.Tensor:
        """Lens probabilities ``[batch, len(layers), vocab]`` (softmax of each layer, cached per layer)."""
        for layer in layers:
            if layer not in self._probs:
                self._probs[layer] = (self.logits[:, layer] - self.lse[:, layer]).exp()
        return torch.stack([self._probs[layer] for layer in layers], 1)

    def for_answer(self, answer: torch.Tensor) -> "LensBatch":
        """The same lens outputs scored for other answer ids ``[batch]`` (e.g. the control
        answers): logits, logsumexp and probabilities are shared, ranks are recomputed."""
        other = LensBatch(self.logits, answer, self.lse)
        other._probs = self._probs
        return other


#: A scorer maps a :class:`LensBatch` to one integer per fact (e.g. the best rank of the answer
#: over an attack's candidate lists): ``[batch]``.
Scorer = Callable[[LensBatch], torch.Tensor]


def answer_rank(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1-based rank of ``target`` in ``logits`` along the last axis (ties count in its favour).

    Args:
        logits: ``[..., vocab]`` scores (logits, log-probs or probabilities: any monotone score).
        target: ``[...]`` token ids, broadcastable to ``logits.shape[:-1]``.

    Returns:
        ``[...]`` long tensor, 1 = the highest score.
    """
    t = logits.gather(-1, target.unsqueeze(-1).expand(*logits.shape[:-1], 1))
    # counting a uint8 view is ~3x faster than summing a bool tensor on CPU
    return (logits > t).view(torch.uint8).sum(-1, dtype=torch.int64) + 1


def answer_rank_two_sided(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Best of the answer's 1-based rank from the top and from the bottom of ``scores``.

    ``min(1 + #{scores > s_a}, 1 + #{scores < s_a})``: the answer is in top-k or bottom-k iff
    this is ``<= k``. Shapes as :func:`answer_rank`.
    """
    t = scores.gather(-1, target.unsqueeze(-1).expand(*scores.shape[:-1], 1))
    above = (scores > t).view(torch.uint8).sum(-1, dtype=torch.int64)
    below = (scores < t).view(torch.uint8).sum(-1, dtype=torch.int64)
    return torch.minimum(above, below) + 1


def auto_batch_size(n_layers: int, vocab: int, budget_bytes: int = 96 << 20) -> int:
    """Prompts per batch so that the fp32 lens logits ``[batch, layers, vocab]`` fit ``budget_bytes``."""
    return int(max(1, min(64, budget_bytes // max(1, 4 * n_layers * vocab))))


def lens_readout(model, prompts: Sequence[str], answers: Sequence[str], *,
                 scorers: Mapping[str, Scorer] | None = None, batch_size: int | None = None,
                 progress: bool = False, desc: str = "lens sweep", lens=None,
                 controls: Sequence[str | None] | None = None, teacher_force: bool = True) -> list[LayerReadout]:
    """Logit-lens readout of the answer at every layer, for each (prompt, answer).

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        prompts, answers: parallel lists; answer ids are taken in context (see
            :func:`probe.answer_ids`).
        scorers: name -> :data:`Scorer`, evaluated on each batch's lens logits; results go to
            ``LayerReadout.attack_ranks[name]``.
        batch_size: prompts per trace (default: sized so the lens logits stay under 96 MB).
        progress: show a tqdm bar.
        lens: decoder of the residuals ``[batch, n_layers, d_model]`` -> logits ``[batch,
            n_layers, vocab]`` (fp32): a :class:`probe.lens.Lens` (e.g. a
            :class:`probe.tuned_lens.TunedLens` for tuned-lens readouts) or any such callable;
            default the model's logit lens.
        teacher_force: run ``prompt + answer[:-1]`` (default) for the full-answer log-probs; with
            False only the prompt runs and the log-probs, exact match and token accuracy cover
            the first answer token alone (the lens readout itself is the same).

    Returns:
        One :class:`~probe.results.LayerReadout` per prompt: per-layer rank (1-based) and lens
        probability of the first answer token at the last prompt token, the lens's top-1 token at
        the last layer (``top_token``), the model's own first-token probability, the
        teacher-forced full-answer log-probability (nats), exact match and the scorers' values.

    Raises:
        InputError / PromptTooLongError: bad prompt or answer.
    """
    scorers = dict(scorers or {})
    if len(prompts) != len(answers) or (controls is not None and len(controls) != len(prompts)):
        raise ValueError("prompts, answers (and controls) must have the same length")
    n_layers, vocab = model.n_layers, model.vocab_size
    batch_size = batch_size or auto_batch_size(n_layers, vocab)
    lens = LogitLens.from_model(model) if lens is None else lens
    out: list[LayerReadout] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        check_interrupt()
        rows, a_ids, p_len = teacher_forced_inputs(model.tokenizer, prompts[start:start + batch_size],
                                                   answers[start:start + batch_size])
        if not teacher_force:
            rows, a_ids = [r[:n] for r, n in zip(rows, p_len)], [a[:1] for a in a_ids]
        B = len(rows)
        with torch.no_grad():
            resid, tok_lps, greedy_ok = teacher_forced(model, rows, a_ids, layers=range(n_layers))
            lens_logits = lens(resid)  # [B, L, V] fp32, one stacked matmul
            first = torch.tensor([a[0] for a in a_ids], device=lens_logits.device)
            shared = LensBatch(lens_logits, first)
            ranks = shared.ranks
            tgt = lens_logits.gather(-1, first[:, None, None].expand(B, n_layers, 1))
            probs = (tgt - shared.lse).exp().squeeze(-1)
            extra = {name: fn(shared).tolist() for name, fn in scorers.items()}
            top = lens_logits[:, -1].argmax(-1).tolist()
            ctl = list(controls[start:start + batch_size]) if controls is not None else [None] * B
            has_ctl = [c is not None for c in ctl]
            c_ranks = None
            if any(has_ctl):
                c_first = torch.tensor([_answer_ids(model.tokenizer, prompts[start + i], c)[0] if c is not None
                                        else int(first[i]) for i, c in enumerate(ctl)], device=lens_logits.device)
                c_batch = shared.for_answer(c_first)
                c_ranks = c_batch.ranks.tolist()
                extra.update({f"{name}@control": fn(c_batch).tolist() for name, fn in scorers.items()})
                del c_batch
            del lens_logits, shared
        ranks, probs = ranks.tolist(), probs.tolist()
        for i in range(B):
            keep = {name: int(v[i]) for name, v in extra.items() if has_ctl[i] or not name.endswith("@control")}
            out.append(LayerReadout(
                rank=[int(r) for r in ranks[i]],
                prob=[float(p) for p in probs[i]],
                first_token_prob=float(tok_lps[i][0].exp()),
                answer_logprob=float(tok_lps[i].sum()),
                token_logprobs=[float(x) for x in tok_lps[i]],
                exact_match=greedy_ok[i] == 1.0,
                token_acc=greedy_ok[i],
                attack_ranks=keep,
                top_token=int(top[i]),
                control_rank=[int(r) for r in c_ranks[i]] if c_ranks is not None and has_ctl[i] else None,
            ))
    return out


def teacher_forced_inputs(tokenizer, prompts: Sequence[str], answers: Sequence[str]):
    """Token rows ``prompt + answer[:-1]`` and each row's answer ids and prompt length.

    Returns:
        ``(rows, answer_ids, prompt_lengths)``: lists of id lists, id lists and ints.
    """
    p_ids = [tokenize(tokenizer, p) for p in prompts]
    a_ids = [_answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    rows = [p + a[:-1] for p, a in zip(p_ids, a_ids)]
    return rows, a_ids, [len(p) for p in p_ids]


def teacher_forced(model, rows, a_ids, *, layers: Sequence[int] = ()) -> tuple[torch.Tensor | None, list[torch.Tensor], list[bool]]:
    """One nnsight trace over teacher-forced rows ``prompt + answer[:-1]``.

    Only the logits of the answer positions are computed (``logits_to_keep``), so the
    unembedding costs ``batch x answer_len`` rows, not ``batch x seq``. Gradients flow if enabled
    by the caller.

    Args:
        rows, a_ids: from :func:`teacher_forced_inputs`.
        layers: decoder layers whose residual at the last prompt token to return.

    Returns:
        ``(resid, token_logprobs, token_acc)``: resid ``[batch, len(layers), d_model]`` (model
        dtype; None if no layers); per row the answer tokens' log-probabilities ``[n_tokens]``
        (fp32, nats); per row the fraction of answer tokens that are the greedy choice (1.0 =
        greedy decoding reproduces the whole answer).
    """
    layers = list(layers)
    batch = encode_ids(model, rows)
    T, B = batch.seq_len, len(rows)
    a_len = torch.tensor([len(a) for a in a_ids], device=batch.lengths.device)
    max_a = int(a_len.max())
    last = T - a_len  # column of the last prompt token (rows end with answer[:-1])
    rows_idx = torch.arange(B, device=last.device)
    with model.nn.trace(**batch.model_inputs(), logits_to_keep=max_a):
        saved = nnsight.save([gather_resid(get_resid(model.layer_envoy(i).output, B), rows_idx, last,
                                           last.device).save() for i in layers])
        logits = model.nn.output.logits.save()  # [B, max_a, V]: positions T - max_a .. T - 1
    tok_lps, greedy_ok = answer_logprobs(torch.log_softmax(logits.float(), -1), a_ids)
    resid = torch.stack(list(saved), 1) if layers else None
    return resid, tok_lps, greedy_ok


def answer_logprobs(logprobs: torch.Tensor, a_ids: Sequence[Sequence[int]]) -> tuple[list[torch.Tensor], list[float]]:
    """Gather each row's answer-token log-probabilities from right-aligned kept positions.

    Args:
        logprobs: ``[batch, max_answer_len, vocab]`` log-probabilities of the last
            ``max_answer_len`` positions of rows ``prompt + answer[:-1]`` (``logits_to_keep``).
        a_ids: the answer ids of the first ``len(a_ids)`` rows.

    Returns:
        ``(token_logprobs, token_acc)``: per row ``[n_tokens]`` log-probabilities (keeps the
        autograd graph), and the fraction of answer tokens that are the greedy choice.
    """
    max_a = logprobs.shape[1]
    tok_lps, token_acc = [], []
    for i, a in enumerate(a_ids):
        tgt = torch.tensor(a, device=logprobs.device)
        row = logprobs[i, max_a - len(a):]
        tok_lps.append(row.gather(-1, tgt[:, None]).squeeze(-1))
        token_acc.append((row.argmax(-1) == tgt).float().mean().item())
    return tok_lps, token_acc


def sequence_logprobs(model, prompts: Sequence[str], answers: Sequence[str], *, grad: bool = False,
                      batch_size: int = 32) -> list[torch.Tensor]:
    """Teacher-forced per-token log-probabilities (nats, fp32) of each answer after its prompt.

    Args:
        grad: keep the autograd graph (defense losses); else runs under no_grad.

    Returns:
        A list with one ``[n_answer_tokens]`` tensor per (prompt, answer); ``.sum()`` is
        log p(answer | prompt).
    """
    out: list[torch.Tensor] = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    for start in range(0, len(prompts), batch_size):
        rows, a_ids, _ = teacher_forced_inputs(model.tokenizer, prompts[start:start + batch_size],
                                                   answers[start:start + batch_size])
        with ctx:
            _, lps, _ = teacher_forced(model, rows, a_ids)
        out.extend(lps)
    return out


def last_token_logprobs(model, prompts: Sequence[str], *, grad: bool = False, batch_size: int = 32) -> torch.Tensor:
    """Next-token log-probabilities (fp32, nats) at the last prompt token: ``[n_prompts, vocab]``."""
    from .tokens import encode

    outs = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    for start in range(0, len(prompts), batch_size):
        batch = encode(model, prompts[start:start + batch_size])
        with ctx:
            with model.nn.trace(**batch.model_inputs(), logits_to_keep=1):
                logits = model.nn.output.logits[:, -1].save()
            outs.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(outs, 0)
