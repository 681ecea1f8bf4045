"""Training and caching the tuned lens (:class:`probe.tuned_lens.TunedLens`; Belrose et al. 2023, section 3).

Training (:func:`train_tuned_lens`) reads the residual stream of every layer once with nnsight
(no_grad) over packed windows of text (32k tokens by default), accumulating the statistics of a
ridge-regularised least-squares fit of the last layer's residual on each layer's (closed form:
30 x 577 x 577 fp64) and keeping a random 4k of the tokens as fp32 tensors (``n_layers x tokens x
d_model``: 30 x 4k x 576 x 4 B = 0.3 GB for SmolLM2); warm-starts each translator with that fit
(or the identity, whichever has the lower KL on a few training tokens), then refines with Adam on
the exact KL until the time or step budget runs out. The least-squares warm start is our addition
for the 2-CPU budget (the paper trains from identity with SGD-Nesterov, 250 steps of 2^18 tokens):
on SmolLM2 it does most of the work; ~45 Adam steps lower the KL by another ~10 %.

Training text (:func:`probe.corpus.default_texts`): prose shipped with the Python interpreter --
the language reference topics of ``pydoc_data.topics`` and the docstrings of the standard-library
modules (read with :mod:`ast`, nothing is imported or downloaded) -- with every paragraph that
mentions a fact's answer, alternative answer or subject dropped: the built-in facts always, and
the facts the caller passes as ``exclude`` (the tests and benchmarks pass CounterFact;
``probe-attack tuned-lens --exclude-facts FILE``), so the lens never sees an evaluated fact.
Lenses trained before ``exclude`` existed filtered CounterFact whenever the development folder
held it; each lens's ``report.text_source`` records the filter it was trained with.

Lenses are cached per model fingerprint in ``cache_dir() / "tuned-lens" / f"{fingerprint}.pt"``
(:func:`get_tuned_lens`: memory, else that file, else trained and saved). Edited clones
(:func:`probe.model.clone_model`) keep the fingerprint of the model they were copied from, so an
attacker on an edited model uses the lens trained on the *unedited* model, decoded through the
edited model's own final norm and unembedding.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm

from . import corpus
from .errors import ProbeAttackError
from .facts import Fact
from .interrupt import check as check_interrupt
from .lens import LogitLens
from .residual import get_resid
from .tuned_lens import TunedLens, TunedLensReport


# ----------------------------------------------------------------------------------------
# residual collection and KL


def iter_residuals(model, windows: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                   desc: str = "residuals"):
    """Every decoder layer's output at every position but the first of each window, batch by batch.

    One nnsight trace per batch of windows (no_grad, ``logits_to_keep=1``). The first real token of
    each window is dropped: it is an attention sink (residual norm ~50x the others in SmolLM2) and
    never the last token of a prompt worth decoding.

    Args:
        windows: token-id rows (any lengths; padded on the left).

    Yields:
        fp32 CPU tensors ``[n_layers, n_tokens_in_batch, d_model]``, tokens in window order.
    """
    from .tokens import encode_ids

    L = model.n_layers
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        check_interrupt()
        rows = windows[start:start + batch_size]
        batch = encode_ids(model, rows, check_length=False)
        B, T = len(rows), batch.seq_len
        keep = batch.attention_mask.bool().clone()
        keep[torch.arange(B), T - batch.lengths] = False
        keep = keep.cpu()
        with torch.no_grad():
            with model.nn.trace(**batch.model_inputs(), logits_to_keep=1):
                saved = nnsight.save([get_resid(model.layer_envoy(i).output, B).save() for i in range(L)])
        yield torch.stack([h.detach().float().cpu()[keep] for h in saved], 0)


def collect_residuals(model, windows: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                      desc: str = "residuals") -> torch.Tensor:
    """All of :func:`iter_residuals` at once: fp32 CPU ``[n_layers, n_tokens, d_model]``
    (``n_tokens = sum(len(w) - 1)``)."""
    parts = list(iter_residuals(model, windows, batch_size=batch_size, progress=progress, desc=desc))
    if not parts:
        return torch.empty(model.n_layers, 0, model.d_model)
    return torch.cat(parts, 1)


def _frozen(unembed: LogitLens) -> LogitLens:
    """A copy of the final norm + unembedding that autograd never differentiates (the model's own
    tensors have ``requires_grad=True``: without this every backward would also compute, and
    accumulate into the model, a ``[vocab, d_model]`` gradient)."""
    norm = copy.deepcopy(unembed.norm).requires_grad_(False)
    bias = unembed.bias.detach() if unembed.bias is not None else None
    return LogitLens(norm, unembed.weight.detach(), bias, unembed.softcap)


class _Target:
    """The final layer's next-token distribution p for a set of token positions, prepared so that
    KL(p || q_lens) costs one unembedding matmul and one logsumexp per layer.

    KL(p || softmax(x)) = logsumexp(x) - sum_v p_v x_v + sum_v p_v log p_v; without a logit
    soft-cap, x = W_U z + c is affine in the normed residual z, so sum_v p_v x_v = (p W_U) . z + p . c
    with ``p W_U`` computed once and shared by every layer.
    """

    def __init__(self, unembed: LogitLens, last_resid: torch.Tensor):
        self.unembed = unembed
        logp = torch.log_softmax(unembed(last_resid), -1)
        p = logp.exp()
        self.neg_entropy = (p * logp).sum(-1)  # [n]
        self.affine = not unembed.softcap
        if self.affine:
            self.pw = p @ unembed.weight  # [n, d]
            self.pb = p @ unembed.bias if unembed.bias is not None else None
            self.p = None
        else:
            self.p = p

    def kl(self, h: torch.Tensor) -> torch.Tensor:
        """``[n]`` KL(p || lens(h)) in nats for translated residuals ``h`` ``[n, d_model]``."""
        u = self.unembed
        if self.affine:
            z = u.norm(h.to(dtype=torch.float32)).float()
            logits = torch.nn.functional.linear(z, u.weight, u.bias)
            cross = (z * self.pw).sum(-1) + (self.pb if self.pb is not None else 0.0)
        else:
            logits = u(h)
            cross = (self.p * logits).sum(-1)
        return torch.logsumexp(logits, -1) - cross + self.neg_entropy


@torch.no_grad()
def layer_kl(lens: TunedLens, resid: torch.Tensor, *, chunk: int = 256, layers: Sequence[int] | None = None,
             identity: bool = False, progress: bool = False, desc: str = "KL") -> list[float]:
    """Mean KL(p_final || p_lens) per layer (nats) over the tokens of ``resid``.

    Args:
        lens: a bound :class:`TunedLens`.
        resid: ``[n_layers, n_tokens, d_model]`` (e.g. from :func:`collect_residuals`); the target
            p_final is the logit lens of the last layer, i.e. the model's own next-token
            distribution.
        identity: evaluate the plain logit lens instead (translators ignored).

    Returns:
        ``len(layers)`` floats (all layers by default).
    """
    L, N, _ = resid.shape
    layers = list(range(L)) if layers is None else [int(x) % L for x in layers]
    sums = torch.zeros(len(layers), dtype=torch.float64)
    unembed = _frozen(lens.unembed)
    dev = unembed.weight.device
    for s in tqdm(range(0, N, chunk), desc=desc, disable=not progress, leave=False):
        check_interrupt()
        tgt = _Target(unembed, resid[L - 1, s:s + chunk].to(dev))
        for j, layer in enumerate(layers):
            h = resid[layer, s:s + chunk].to(dev)
            sums[j] += tgt.kl(h if identity else lens.translate(h, layer)).clamp_min(0).double().sum().cpu()
    return [float(x) / max(1, N) for x in sums]


class _LstsqStats:
    """Sufficient statistics of the closed-form warm start, accumulated over token batches, so the
    warm start can use many more tokens than fit in memory.

    For every layer l: weighted ridge least squares of the last layer's residual y on ``[h_l, 1]``
    with weights 1 / ||y||^2 (every token counts by its direction, which is all the final RMS/Layer
    norm keeps), shrunk towards the identity: ``A_l = W_l - I`` and ``b_l``.
    """

    def __init__(self, n_layers: int, d_model: int):
        self.n = 0
        self.xtx = torch.zeros(n_layers - 1, d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_layers - 1, d_model + 1, d_model, dtype=torch.float64)

    def add(self, resid: torch.Tensor) -> None:
        """Accumulate ``[n_layers, n_tokens, d_model]`` (fp32 products per batch, fp64 sums)."""
        L, N, _ = resid.shape
        y = resid[L - 1]
        w = 1.0 / y.double().pow(2).sum(-1).clamp_min(1e-12)
        sw = w.sqrt().float()[:, None]
        xa = torch.cat([resid[:L - 1], torch.ones(L - 1, N, 1)], -1) * sw  # [L-1, N, d+1]
        self.xtx += torch.bmm(xa.transpose(1, 2), xa).double()
        self.xty += torch.matmul(xa.transpose(1, 2), y * sw).double()
        self.n += N

    def solve(self, layer: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` for ``layer`` (fp32), with ridge ``ridge * mean(diag(X^T X))`` towards A = 0."""
        xtx, xty = self.xtx[layer], self.xty[layer]
        d = xty.shape[1]
        lam = ridge * float(torch.diagonal(xtx).mean())
        eye = torch.zeros(d + 1, d, dtype=torch.float64)
        eye[:d] = torch.eye(d, dtype=torch.float64)
        beta = torch.linalg.solve(xtx + lam * torch.eye(d + 1, dtype=torch.float64), xty + lam * eye)
        return (beta[:d].T - torch.eye(d, dtype=torch.float64)).float(), beta[d].float()


class _PhaseClock:
    """Wall-clock seconds per training phase (``secs``, printed on stderr with ``progress``) and
    the deadline of the whole call (``time.perf_counter`` units; ``inf`` when ``minutes`` is None)."""

    def __init__(self, progress: bool, minutes: float | None):
        self.progress = progress
        self.secs: dict[str, float] = {}
        self.t0 = self.t = time.perf_counter()
        self.deadline = self.t0 + minutes * 60 if minutes is not None else math.inf

    def lap(self, name: str) -> float:
        """Record phase ``name`` as the time since the previous lap (or the start); returns now."""
        now = time.perf_counter()
        self.secs[name] = round(now - self.t, 2)
        if self.progress:
            print(f"tuned lens: {name} {now - self.t:.1f} s", file=sys.stderr)
        self.t = now
        return now

    def total(self) -> dict[str, float]:
        """``secs`` with ``"total"``: start to the last lap."""
        self.secs["total"] = round(self.t - self.t0, 2)
        return self.secs


def _check_budget(minutes: float | None, steps: int | None, init: str) -> None:
    """ValueError for no budget (``minutes`` and ``steps`` both None) or an unknown ``init``."""
    if minutes is None and steps is None:
        raise ValueError("give minutes or steps")
    if init not in ("auto", "identity", "lstsq"):
        raise ValueError(f"unknown init {init!r}; use auto, identity or lstsq")


def _heldout_logit_kl(model, lens: TunedLens, w_held, collect_batch: int,
                      progress: bool) -> tuple[torch.Tensor, list[float], float]:
    """Read the held-out windows' residuals and the logit lens's per-layer KL (nats) on them.

    Returns ``(residuals [n_layers, n_tokens, d_model], KL per layer, reserve)``, ``reserve`` being
    the seconds set aside for the final evaluation and saving.
    """
    H_eval = collect_residuals(model, w_held, batch_size=collect_batch, progress=progress, desc="held-out residuals")
    t_eval = time.perf_counter()
    kl_logit = layer_kl(lens, H_eval, identity=True, progress=progress, desc="KL logit lens")
    eval_s = time.perf_counter() - t_eval
    return H_eval, kl_logit, 1.15 * eval_s + 2.0


def _training_windows(model, texts, exclude, seq_len: int, heldout_tokens: int, train_tokens: int,
                      seed: int) -> tuple[list, list, int, str]:
    """``(held-out windows, training windows, seq_len, text source)``: the text (default corpus minus
    ``exclude`` when ``texts`` is None) packed into windows, whole documents held out.

    Raises ValueError when there is too little text for one window of each.
    """
    source = "user texts"
    if texts is None:
        exclude = list(exclude)
        texts = corpus.default_texts(exclude)
        source = corpus.default_text_source(exclude)
    ctx = model.context_length
    seq_len = min(seq_len, ctx) if ctx else seq_len
    w_held, w_train = corpus.split_windows(model.tokenizer, texts, seq_len, heldout_tokens=heldout_tokens,
                                           train_tokens=train_tokens, seed=seed)  # whole documents held out
    if not w_train or not w_held:
        raise ValueError(f"too little text for one training and one held-out window of {seq_len} tokens")
    return w_held, w_train, seq_len, source


def _collect_training(model, w_train, stats: _LstsqStats | None, keep_frac: float, gen: torch.Generator,
                      collect_end: float, batch: int, collect_batch: int, progress: bool) -> tuple[torch.Tensor, int]:
    """Stream the training windows through ``model``: add every batch to ``stats`` and keep each
    token with probability ``keep_frac`` (drawn from ``gen``); stop after ``collect_end``
    (``time.perf_counter``) once ``batch`` tokens are kept.

    Returns ``(kept residuals [n_layers, n_kept, d_model], tokens read)``.
    """
    kept, n_train = [], 0
    for Hb in iter_residuals(model, w_train, batch_size=collect_batch, progress=progress, desc="train residuals"):
        if stats is not None:
            stats.add(Hb)
        n_train += Hb.shape[1]
        sel = torch.rand(Hb.shape[1], generator=gen) < keep_frac
        kept.append(Hb[:, sel].clone())
        if time.perf_counter() > collect_end and sum(k.shape[1] for k in kept) >= batch:
            break
    H = torch.cat(kept, 1)
    del kept
    return H, n_train


def _warm_start(lens: TunedLens, stats: _LstsqStats | None, H: torch.Tensor, init: str, seed: int) -> list[str]:
    """Set every translator but the last to its least-squares solution where ``init == "lstsq"``, or
    where that beats the identity on 128 kept tokens (``"auto"``), else to the identity.

    Returns the per-layer choice (``"identity"`` / ``"lstsq"``, ``n_layers`` entries).
    """
    L = H.shape[0]
    chosen = ["identity"] * L
    if stats is None:
        return chosen
    probe_idx = torch.randperm(H.shape[1], generator=torch.Generator().manual_seed(seed))[:128]
    H_probe = H[:, probe_idx]
    base = layer_kl(lens, H_probe, identity=True)
    for layer in range(L - 1):
        check_interrupt()
        A, b = stats.solve(layer)
        with torch.no_grad():
            lens.weight[layer].copy_(A)
            lens.bias[layer].copy_(b)
    ls = layer_kl(lens, H_probe)
    with torch.no_grad():
        for layer in range(L - 1):
            if init == "lstsq" or ls[layer] < base[layer]:
                chosen[layer] = "lstsq"
            else:
                lens.weight[layer].zero_()
                lens.bias[layer].zero_()
    return chosen


def _adam_step(lens: TunedLens, opt: torch.optim.Optimizer, unembed, H: torch.Tensor, idx: torch.Tensor,
               train_layers: list[int]) -> float:
    """One Adam step on the mean over ``train_layers`` of KL(p_final || p_l) at positions ``idx``;
    returns the loss (nats)."""
    L = H.shape[0]
    dev = lens.weight.device
    with torch.no_grad():
        tgt = _Target(unembed, H[L - 1, idx].to(dev))
        h = H[:L - 1, idx].to(dev)  # [L-1, batch, d]
    # translate all layers in one batched matmul; the per-layer vocab-sized losses backprop
    # into a small leaf, whose gradient then flows through the translators once
    moved = torch.baddbmm(lens.bias[:L - 1, None], h, lens.weight[:L - 1].transpose(1, 2)) + h
    leaf = moved.detach().requires_grad_(True)
    total = 0.0
    for layer in train_layers:
        loss = tgt.kl(leaf[layer]).mean() / len(train_layers)
        loss.backward()
        total += float(loss.detach())
    moved.backward(leaf.grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def _adam(lens: TunedLens, H: torch.Tensor, gen: torch.Generator, *, steps: int | None, batch: int, lr: float,
          train_end: float, progress: bool) -> int:
    """Adam on random batches of ``batch`` kept positions (drawn from ``gen``), learning rate
    decaying linearly from ``lr`` to 10 % over ``steps`` (or until ``train_end``, a
    ``time.perf_counter`` deadline); stops when the next step would pass ``train_end``.

    Returns the number of steps taken.
    """
    L, N = H.shape[0], H.shape[1]
    train_layers = list(range(L - 1))
    unembed = _frozen(lens.unembed)
    opt = torch.optim.Adam([lens.weight, lens.bias], lr=lr)
    n_steps, step_s = 0, 0.0
    bar = tqdm(total=steps, desc="tuned lens", disable=not progress, leave=False)
    t_train = time.perf_counter()
    while train_layers and (steps is None or n_steps < steps):
        now = time.perf_counter()
        if now + step_s > train_end:
            break
        check_interrupt()
        if steps is not None:
            frac = n_steps / steps
        else:
            frac = min(1.0, (now - t_train) / max(1e-6, train_end - t_train))
        for g in opt.param_groups:
            g["lr"] = lr * (1.0 - 0.9 * frac)
        s0 = time.perf_counter()
        idx = torch.randint(0, N, (batch,), generator=gen)
        total = _adam_step(lens, opt, unembed, H, idx, train_layers)
        n_steps += 1
        dt = time.perf_counter() - s0
        step_s = dt if n_steps == 1 else 0.8 * step_s + 0.2 * dt
        bar.update(1)
        bar.set_postfix(kl=f"{total:.3f}")
    bar.close()
    return n_steps


def _fit(model, lens: TunedLens, w_train, clock: _PhaseClock, reserve: float, *, init: str, seed: int,
         seq_len: int, batch: int, adam_tokens: int, collect_share: float, collect_batch: int, steps: int | None,
         lr: float, progress: bool) -> tuple[int, int, list[str], int]:
    """Collect the training residuals, warm-start and train ``lens`` in place (phases ``collect``,
    ``init``, ``train`` of ``clock``); one seeded generator draws the kept tokens, then the Adam batches.

    Returns ``(tokens read, tokens kept for Adam, per-layer init, Adam steps)``.
    """
    L = model.n_layers
    stats = _LstsqStats(L, model.d_model) if init != "identity" and L > 1 else None
    keep_frac = min(1.0, adam_tokens / max(1, len(w_train) * (seq_len - 1)))
    collect_end = clock.t + collect_share * max(0.0, clock.deadline - reserve - clock.t)
    gen = torch.Generator().manual_seed(seed)
    H, n_train = _collect_training(model, w_train, stats, keep_frac, gen, collect_end, batch, collect_batch, progress)
    clock.lap("collect")
    chosen = _warm_start(lens, stats, H, init, seed)
    del stats
    clock.lap("init")
    n_steps = _adam(lens, H, gen, steps=steps, batch=batch, lr=lr, train_end=clock.deadline - reserve,
                    progress=progress)
    clock.lap("train")
    return n_train, H.shape[1], chosen, n_steps


def train_tuned_lens(model, *, texts: Sequence[str] | None = None, exclude: Iterable[Fact | str] = (),
                     minutes: float | None = 8.0,
                     steps: int | None = None, seq_len: int = 128, batch: int = 64,
                     train_tokens: int = 32768, heldout_tokens: int = 512, adam_tokens: int = 4096,
                     lr: float = 3e-4, init: str = "auto", seed: int = 0, progress: bool = False,
                     collect_batch: int = 8, collect_share: float = 0.55) -> tuple[TunedLens, TunedLensReport]:
    """Train a tuned lens for ``model`` (Belrose et al. 2023, section 3).

    Phases: pack text into windows (whole documents held out); read every layer's residuals once
    with nnsight (no_grad) and evaluate the logit lens's KL on the held-out windows; stream the
    training windows through the model, accumulating least-squares statistics over all their
    tokens and keeping a random ``adam_tokens`` of them in memory; warm-start every translator but
    the last (identity, or ridge least squares -- the better on 128 kept tokens with
    ``init="auto"``); minimise the mean over layers of KL(p_final || p_l) with Adam (linearly
    decaying learning rate) on random batches of ``batch`` kept positions, all layers per step;
    evaluate again.

    Args:
        model: a :class:`~probe.model.ProbeModel`.
        texts: training documents (strings); default :func:`probe.corpus.default_texts`. They are
            shuffled (seeded); the first documents fill the held-out windows, the rest the training
            ones, so no document is in both (:func:`probe.corpus.split_windows`).
        exclude: with the default text, facts (and strings) whose answers and subjects must not
            appear in it besides the built-in facts' (e.g. the CounterFact facts under
            evaluation); ignored when ``texts`` is given.
        minutes: wall-clock budget of the whole call, including data collection and both
            evaluations; optimisation stops early enough to finish on time (None = no limit).
        steps: maximum number of Adam steps (None = until ``minutes``; one of the two is needed).
        seq_len: tokens per window (the first position of each window is not scored).
        batch: token positions per Adam step.
        train_tokens, heldout_tokens: scored positions to read for training (at most; with
            ``minutes`` reading stops after ``collect_share`` of the time left) / evaluation.
        adam_tokens: training positions kept in memory for Adam (memory:
            ``n_layers * (adam_tokens + heldout_tokens) * d_model * 4`` bytes, 0.6 GB for SmolLM2).
        collect_share: share of the time left after the first evaluation that reading training
            text may take (the rest goes to Adam and the final evaluation).
        lr: peak Adam learning rate (decays linearly to 10 % of it).
        init: ``"auto"``, ``"identity"`` or ``"lstsq"``.
        seed: seeds the document split and the token sampling.
        progress: tqdm bars and phase messages on stderr.

    Returns:
        ``(lens, report)``: the trained lens, bound to ``model``, and a :class:`TunedLensReport`
        (per-layer held-out KL of the logit lens vs the tuned lens, nats).

    Raises:
        ValueError: no budget (``minutes`` and ``steps`` both None), an unknown ``init``, or too
            little text for one training and one held-out window.
    """
    _check_budget(minutes, steps, init)
    clock = _PhaseClock(progress, minutes)
    w_held, w_train, seq_len, source = _training_windows(model, texts, exclude, seq_len, heldout_tokens,
                                                         train_tokens, seed)
    clock.lap("texts")
    lens = TunedLens.from_model(model)
    H_eval, kl_logit, reserve = _heldout_logit_kl(model, lens, w_held, collect_batch, progress)
    clock.lap("eval_before")
    n_train, n_adam, chosen, n_steps = _fit(
        model, lens, w_train, clock, reserve, init=init, seed=seed, seq_len=seq_len, batch=batch,
        adam_tokens=adam_tokens, collect_share=collect_share, collect_batch=collect_batch, steps=steps, lr=lr,
        progress=progress)
    kl_tuned = layer_kl(lens, H_eval, progress=progress, desc="KL tuned lens")
    clock.lap("eval_after")
    report = TunedLensReport(kl_logit=kl_logit, kl_tuned=kl_tuned, n_train_tokens=int(n_train),
                             n_adam_tokens=int(n_adam), n_heldout_tokens=int(H_eval.shape[1]), init=chosen,
                             steps=n_steps, tokens_per_step=batch, seq_len=seq_len, lr=lr, seed=seed,
                             seconds=clock.total(), text_source=source, model_name=model.name,
                             fingerprint=model.fingerprint, torch_threads=torch.get_num_threads())
    lens.report = report
    del H_eval
    return lens, report


# ----------------------------------------------------------------------------------------
# the cache


_LOADED: dict[str, TunedLens] = {}


def lens_path(model) -> Path:
    """``cache_dir() / "tuned-lens" / f"{model.fingerprint}.pt"``."""
    from .model import cache_dir

    return cache_dir() / "tuned-lens" / f"{model.fingerprint}.pt"


def get_tuned_lens(model, *, train_if_missing: bool = True, retrain: bool = False,
                   **train_kwargs) -> TunedLens:
    """The tuned lens of ``model``'s fingerprint: from memory, else from the on-disk cache
    (:func:`lens_path`), else trained with :func:`train_tuned_lens` (``train_kwargs``, e.g.
    ``minutes``, ``steps``, ``exclude``: facts kept out of the training text) and saved there
    atomically.

    The lens is bound to ``model`` (its final norm and unembedding). An edited clone shares its
    original's fingerprint and therefore gets the lens trained on the *unedited* model -- so call
    this on the unedited model first, or the lens would be trained on the edited one.

    Raises:
        FileNotFoundError: no cached lens and ``train_if_missing=False``.
        TunedLensMismatchError: the cached file does not fit the model.
    """
    path = lens_path(model)
    key = str(path.resolve())
    lens = None if retrain else _LOADED.get(key)
    if lens is None and not retrain and path.is_file():
        lens = TunedLens.load(path, model)
    if lens is None:
        if not train_if_missing:
            raise FileNotFoundError(f"no tuned lens for model {model.name!r} (fingerprint {model.fingerprint}) at "
                                    f"{path}; train one with `probe-attack tuned-lens`")
        lens, _ = train_tuned_lens(model, **train_kwargs)
        lens.save(path)
    _LOADED[key] = lens
    if lens._unembed is not LogitLens.from_model(model):
        lens.bind(model)
    return lens


# ----------------------------------------------------------------------------------------
# the ``probe-attack tuned-lens`` command


def tuned_lens_command(*, model: str | None = None, minutes: float | None = 8.0, steps: int | None = None,
                       out: str | None = None, retrain: bool = False, seed: int = 0, device: str = "cpu",
                       quiet: bool = False, exclude_facts: str | None = None) -> int:
    """``probe-attack tuned-lens [--model M] [--minutes X] [--steps N] [--out FILE] [--retrain]
    [--exclude-facts FILE]`` (flags parsed by :func:`probe.cli.build_parser`).

    Trains (or loads) the tuned lens, saves it to the cache, prints the per-layer KL table and,
    with ``out``, writes the :class:`~probe.tuned_lens.TunedLensReport` as JSON. ``exclude_facts``:
    a facts file (JSONL or CounterFact JSON) whose answers and subjects are dropped from the
    training text besides the built-in facts'. Returns the exit status (0; 2 for bad input, with
    one line on stderr).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .facts import load_facts
    from .model import load_model

    try:
        if minutes is not None and minutes <= 0:
            raise ValueError("--minutes must be > 0")
        exclude = load_facts(exclude_facts) if exclude_facts else []
        probe_model = load_model(model, device=device)
        path = lens_path(probe_model)
        cached = path.is_file() and not retrain
        lens = get_tuned_lens(probe_model, retrain=retrain, minutes=minutes, steps=steps, seed=seed,
                              progress=not quiet, exclude=exclude)
    except (ProbeAttackError, ValueError) as exc:
        print(f"probe-attack: error: {exc}", file=sys.stderr)
        return 2
    report = lens.report
    print(f"tuned lens for {probe_model.name} (fingerprint {probe_model.fingerprint}): {path}"
          f"{' (cached)' if cached else ''}")
    if report is None:
        print("(no training report stored with this lens)")
    else:
        print(report.table())
        if out:
            from .atomic import write_text_atomic

            write_text_atomic(out, json.dumps({**report.to_json(), "path": str(path)}, indent=1))
    return 0


__all__ = ["iter_residuals", "collect_residuals", "layer_kl", "train_tuned_lens", "lens_path", "get_tuned_lens",
           "tuned_lens_command"]
