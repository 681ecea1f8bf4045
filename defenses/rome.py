"""ROME: a rank-one update of one MLP output projection, keyed on the subject's last token.

Meng, Bau, Andonian & Belinkov (NeurIPS 2022), "Locating and Editing Factual Associations in GPT",
section 3 and the reference code (``rome/rome_main.py``, ``compute_u.py``, ``compute_v.py``,
hparams ``ROME/EleutherAI_gpt-j-6B.json``); the text paper's main editor (Patil, Hase & Bansal,
ICLR 2024, section 4 and method.md section 4.2), where each deletion objective *replaces* ROME's
target NLL inside the v* optimisation.

With W the MLP output projection (``down_proj`` / ``c_proj``) of the edit layer:

1. **Key** k*: the input of W at the subject's last token, averaged over the prompt and its
   context-prefixed versions (:data:`CONTEXT_PREFIXES`: fixed short sentences in the style of
   ROME's generated templates, disjoint from the attack and defense prefixes of
   :mod:`probe.rephrase`; fixed instead of sampled so edits are deterministic).
2. **Value** v* = v_init + delta: v_init is W's output at the subject's last token of the plain
   prompt; delta ``[d_model]`` is added to W's output at the subject's last token of every row
   (each row's column computed from its left padding) and optimised with Adam
   (``v_steps`` = 20 updates for the deletion objectives, 20 passes of which 19 update for the
   target objectives, as in the reference code; ``v_lr`` = 0.5) on::

       objective(rows) + kl_factor * KL(p_delta || p_0)["{subject} is a"] + v_weight_decay * |delta| / |v_init|^2

   where the objective's loss comes from :func:`defenses.forward.objective_forward` (one nnsight
   trace per step; hidden-state objectives read the lens at their defense layers in that trace),
   the rows are the prompt under every context prefix, and after each step delta is projected
   onto the ball ``|delta| <= clamp_norm_factor * |v_init|``. The weight decay is the reference
   code's form (``torch.norm(delta) / torch.norm(target_init) ** 2``). The KL term reads the
   next-token distribution at the *last* token of "{subject} is a" (the reference code reads it at
   the subject's last token; :func:`objective_forward` keeps only the last positions' logits),
   with delta added at the subject's last token as in the reference.
3. **Update** (reference code, ``rome_main.py``): u = (C + lambda I)^-1 k*, with C = E[k k^T]
   over generic text (:mod:`defenses.rome_stats`) and the ridge lambda =
   ``mom2_ridge * mean(diag C)`` (our addition: our C is estimated from ~20k tokens, not 100k
   Wikipedia samples); then ``W <- W + (v* - W k) u^T / (u^T k)`` with k the plain prompt's key,
   which is ``delta u^T / (u^T k)``: the edited MLP maps k exactly to v*. The paper's eq. 2 uses the
   averaged k* in the last two places; the reference code (and so the papers' numbers) use the
   plain prompt's key. All update arithmetic runs in fp64/fp32 and the result is cast back to the
   weight's dtype.

**Retain prompts (our extension, ``retain_weight``).** u is computed *before* the v*
optimisation, so the final edit's exact effect on any token is known: W's output moves by
``delta * (u . k_t)``. During the v* optimisation that shift is added at every token of the
``request.retain_prompts`` rows, and ``retain_weight`` times the KL retain loss (as in
constrained fine-tuning) keeps their next-token distributions; ``retain_weight=0`` is plain ROME.
On SmolLM2 the subject keys of same-relation prompts overlap strongly ("The capital of Japan is"
gets ~0.4 of the France edit at layer 6), so without it the neighbours move (see the report in
``tests/benchmarks/editor_tuning.py``). ``v_exact=True`` also uses that exact shift on the
deletion rows (every token, instead of ROME's delta at the subject's last token only), so the
objective optimised is the edited model's.

One fact per edit: ROME writes one key/value pair. A request with several prompts of the *same*
fact (input-rephrasing defense) is supported: delta is optimised over all of them (times the
context prefixes), k* averages every row's key and v_init/k come from the first prompt. A request
with several facts (the all-at-once protocol: different (subject, answer) pairs) raises
ValueError. Every prompt needs its ``subject`` (the key is read at its last token): a request
with a ``None`` or blank subject raises ValueError, and :func:`check_subjects` refuses such facts
for a whole job before anything is written (keying on the prompt's last token instead -- "is" --
would edit every prompt of the relation at once).

**All v* steps.** ``early_stop`` defaults to None: the v* optimisation runs all ``v_steps``
passes, as the text paper's reference code does for the deletion objectives; an explicit
``early_stop`` (e.g. ``"auto"``) is honoured. The editor
loop (:meth:`defenses.editor.Editor.edit`) may still reject an update that blew up the total loss
(restoring delta, clearing Adam's moments and halving ``v_lr``), recorded in ``EditInfo.extra``.

**Our additions** (named in :meth:`ROME.config` and so in every run's ``editor_config``):
``retain_weight`` (the exact-shift retain KL, below) and ``v_exact``; ``retain_weight=0,
v_exact=False`` is the reference's ROME (with our statistics corpus and ridge ``mom2_ridge``).

nnsight needs interventions in module execution order, so every defense layer of a
hidden-state objective must be at or after the edit layer (the lens at the edit layer itself is
read after its MLP, so equality is allowed); otherwise :meth:`ROME.edit` raises ValueError.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from probe.arch import get_attr_path, mlp_out_envoy
from probe.errors import InputError
from probe.images import ImagePrompt, expanded_position
from probe.model import ProbeModel, only_trainable
from probe.tokens import encode_ids, tokenize, tokenize_with_offsets

from .base import DeletionRequest, Objective, register_editor
from .editor import EditFailed, Editor, EditSession, Steps
from .forward import StepLoss, objective_forward, prepare, retain_kl
from .rome_stats import key_covariance

#: Context prefixes for the key average and the v* rows (the plain prompt is always row 0).
#: ROME samples ~10 short continuations of "The", "Therefore", "Because", "I", "You"; these are fixed
#: sentences with the same openings, disjoint from ``probe.rephrase`` ATTACK/DEFENSE_PREFIXES.
CONTEXT_PREFIXES: tuple[str, ...] = (
    "The following text is about a well-known fact. ",
    "Therefore, it is worth remembering this. ",
    "Because many people ask about it. ",
    "I read this in a book last year. ",
    "You may already know the answer. ",
)


def subject_span(prompt: str, subject: str | None) -> tuple[int, int] | None:
    """Character span ``[start, end)`` of the first occurrence of ``subject`` in ``prompt`` (exact,
    else case-insensitive); None when ``subject`` is None or blank.

    Raises:
        ValueError: ``subject`` does not occur in ``prompt``.
    """
    if subject is None or not subject.strip():
        return None
    subject = subject.strip()
    i = prompt.find(subject)
    if i < 0:
        i = prompt.lower().find(subject.lower())
    if i < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return i, i + len(subject)


def last_token_index(tokenizer, text: str, span: tuple[int, int] | None) -> int:
    """Index, in ``probe.tokens.tokenize(tokenizer, text)``, of the last token overlapping the
    character span ``span`` (ROME's ``subject_last`` fact token); the last token when ``span`` is
    None.

    Uses the fast tokenizer's offset mapping (:func:`probe.tokens.tokenize_with_offsets`, so a text
    written with the BOS text, ``"<bos>The ..."``, gets the index in its one-BOS ids); tokenizers
    without offsets fall back to tokenising the text up to the span's end.
    """
    ids = tokenize(tokenizer, text)
    if span is None:
        return len(ids) - 1
    start, end = span
    if isinstance(text, ImagePrompt):
        # index in the unexpanded row (the image = one placeholder token): tokenise the text with
        # the <image> token in its place; the span moves by where the prompt text sits in it
        full = text.text
        shift = full.index(str(text)) if str(text) in full else 0
        enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
        hits = [i for i, (s, e) in enumerate(enc["offset_mapping"])
                if e > s and s < end + shift and e > start + shift]
        if len(enc["input_ids"]) == len(ids) and hits:
            return hits[-1]
        return max(0, min(len(tokenizer(full[:end + shift], add_special_tokens=True)["input_ids"]), len(ids)) - 1)
    _, spans = tokenize_with_offsets(tokenizer, text)
    hits = [i for i, (s, e) in enumerate(spans or []) if e > s and s < end and e > start]
    if hits:
        return hits[-1]
    n = len(tokenize(tokenizer, text[:end]))
    return max(0, min(n, len(ids)) - 1)


def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def check_subjects(facts: Sequence) -> None:
    """Refuse, before any output is written, facts ROME cannot edit: every fact needs a
    ``subject`` (non-blank, a substring of its prompt; ROME keys the edit at its last token).

    Args:
        facts: :class:`probe.facts.Fact` objects (anything with ``id``, ``prompt``, ``subject``;
            ``where()`` gives the file and line when present).

    Raises:
        InputError: (field ``subject``, with the fact's file and line when known) the first fact
            without a subject, or whose subject does not occur in its prompt; the message names
            the fact's id.
    """
    for f in facts:
        file, line = f.where() if hasattr(f, "where") else (None, None)
        subject = getattr(f, "subject", None)
        if subject is None or not str(subject).strip():
            raise InputError(f"fact {f.id!r} has no subject; the rome editor keys its edit on the subject's last "
                             "token: add a `subject` (a substring of the prompt) or use --editor constrained-ft / lora",
                             file=file, line=line, field="subject")
        try:
            subject_span(str(f.prompt), subject)
        except ValueError as exc:
            raise InputError(f"fact {f.id!r}: {exc}", file=file, line=line, field="subject") from None


@register_editor("rome")
@dataclass
class ROME(Editor):
    """Rank-One Model Editing of one layer's MLP output projection (see the module docstring).

    Attributes:
        layer: decoder layer to edit; None = ``layer_frac`` of depth (:func:`probe.layers.layer_at_depth`).
        layer_frac: relative depth of the default layer (ROME edits layer 5-7 of 28-32: ~0.2;
            SmolLM2-135M: layer 6 of 30).
        v_steps: Adam updates of the v* optimisation for the deletion objectives (then one
            measuring pass), as the text paper's reference code runs them; for the target
            objectives (empty response, error injection) ``v_steps`` forward passes of which the
            last only measures (``v_steps - 1`` updates), as ROME's reference code.
        v_lr: Adam learning rate for delta.
        clamp_norm_factor: ``|delta| <= clamp_norm_factor * |v_init|`` after every step.
        v_weight_decay: weight of ``|delta| / |v_init|^2``.
        kl_factor: weight of the KL term on ``kl_prompt`` (0 disables it).
        kl_prompt: essence prompt, ``{}`` = the subject.
        context_prefixes: prefixes of the key average and of the v* rows (row 0 is always the
            plain prompt).
        mom2_tokens: corpus tokens for C = E[k k^T] (:mod:`defenses.rome_stats`).
        mom2_ridge: ridge added to C, relative to its mean diagonal.
        retain_weight: weight of the KL retain loss on ``request.retain_prompts`` under the
            final update's exact effect (0: plain ROME, retain prompts ignored).
        v_exact: optimise delta under the final update's exact effect on the deletion rows too
            (every token shifted by ``delta * (u . k_t)``) instead of ROME's subject-token delta.
        early_stop: stop once the objective's loss is below this value; ``"auto"`` uses the
            objective's threshold (fact erasure: p < 0.01); None (default) runs all ``v_steps``,
            as the text paper's reference code (R-TXT ``rome/compute_v.py``, method.md section
            4.2: 20 steps) does for the deletion objectives.
    """

    layer: int | None = None
    layer_frac: float = 0.2
    v_steps: int = 20
    v_lr: float = 0.5
    clamp_norm_factor: float = 4.0
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    context_prefixes: tuple[str, ...] = CONTEXT_PREFIXES
    mom2_tokens: int = 20480
    mom2_ridge: float = 1e-2
    retain_weight: float = 5.0
    v_exact: bool = True
    early_stop: float | str | None = None

    #: the edit size: v* steps and the clamp on |delta| / |v_init|
    calibration_ladder: ClassVar[tuple[dict, ...]] = (
        {"v_steps": 5, "clamp_norm_factor": 0.5}, {"v_steps": 10, "clamp_norm_factor": 1.0},
        {"v_steps": 20, "clamp_norm_factor": 1.0}, {"v_steps": 20, "clamp_norm_factor": 2.0},
        {"v_steps": 20, "clamp_norm_factor": 4.0}, {"v_steps": 30, "clamp_norm_factor": 8.0})
    #: below the ladder: the clamp on |delta| / |v_init| halved, up to 4 times
    calibration_max_descent: ClassVar[int] = 4

    @classmethod
    def calibration_weaker(cls, rung: dict) -> dict | None:
        return {**rung, "clamp_norm_factor": rung.get("clamp_norm_factor", cls.clamp_norm_factor) / 2}
    _mom2: dict = field(default_factory=dict, repr=False, compare=False)

    multi_fact = False  # one key/value pair per edit: refuses the all-at-once protocol

    # -- editor interface -----------------------------------------------------------------
    def config(self) -> dict:
        out = super().config()
        out["context_prefixes"] = list(self.context_prefixes)
        return out

    # -- pieces ---------------------------------------------------------------------------
    def covariance(self, model: ProbeModel, layer: int, param_name: str) -> torch.Tensor:
        """C = E[k k^T] ``[d_in, d_in]`` (fp32) at ``layer``: from this editor's memory, else the
        on-disk cache, else computed (:func:`defenses.rome_stats.key_covariance`)."""
        key = (model.fingerprint, param_name, self.mom2_tokens, str(model.device))
        if key not in self._mom2:
            self._mom2[key] = key_covariance(model, layer, param_name, n_tokens=self.mom2_tokens)
        return self._mom2[key]

    def check_facts(self, facts) -> None:
        """Every fact needs a subject in its prompt (:func:`check_subjects`)."""
        check_subjects(facts)

    def _check(self, model: ProbeModel, objective: Objective) -> None:
        """Every defense layer of ``objective`` must be at or after the edit layer."""
        self.check_layers(model, objective)

    def check_layers(self, model: ProbeModel, objective: Objective) -> int:
        """The edit layer, after checking that no defense layer of ``objective`` precedes it.

        Raises:
            ValueError: a defense layer is before the edit layer.
        """
        layer = self.resolve_layer(model)
        n = model.n_layers
        early = sorted({int(l) % n for l in objective.layers(n) if int(l) % n < layer})
        if early:
            raise ValueError(
                f"rome edits layer {layer}, but the {objective.cli_name} defense reads layer(s) {early} before it; "
                "nnsight intervenes in execution order, so every defense layer must be at or after the edit "
                "layer: lower the editor's layer (layer / layer_frac) or move the defense layers later")
        return layer

    @staticmethod
    def _one_fact(request: DeletionRequest) -> list[str]:
        """The request's subjects (one per prompt), after checking that every prompt has one and
        that they all name one fact.

        Raises:
            ValueError: a prompt without a subject, or several facts in one request.
        """
        subjects = list(request.subjects) if request.subjects is not None else [None] * len(request.prompts)
        if len(subjects) != len(request.prompts):
            raise ValueError("request.subjects must have one entry per prompt")
        for p, s in zip(request.prompts, subjects):
            if s is None or not str(s).strip():
                raise ValueError(f"rome keys its edit on the subject's last token, but the prompt {str(p)!r} has "
                                 "no subject; give the fact a `subject` (a substring of its prompt) or use the "
                                 "constrained-ft or lora editor")
        facts = {((s or "").strip().lower(), a.strip().lower()) for s, a in zip(subjects, request.answers)}
        if len(facts) > 1:
            raise ValueError("rome edits one fact (one subject and answer) per edit, but the request holds "
                             f"{len(facts)}; use the one-at-a-time protocol with the rome editor")
        return subjects

    # -- the edit -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _run(self, session: EditSession, objective: Objective, request: DeletionRequest):
        """Optimise v* for ``objective`` (the loop's steps), then write the rank-one update into
        ``session.model``. ``EditInfo.extra``: ``delta_norm`` and ``v_init_norm`` (L2,
        activation units); ``losses``: per forward pass the total loss (objective + KL + weight
        decay).

        Raises:
            ValueError: a defense layer precedes the edit layer, the request holds several facts,
                a prompt has no subject, or a subject does not occur in its prompt (nothing is
                modified).
            EditFailed: v* became non-finite (the base restores the weight).
        """
        model = session.model
        tok = model.tokenizer
        layer = self.check_layers(model, objective)
        subjects = self._one_fact(request)
        env = mlp_out_envoy(model, layer)
        module = get_attr_path(model.hf, session.param_name.rsplit(".", 1)[0])

        # rows: every prompt under every context prefix (row 0: the first prompt, plain)
        prompts, positions, row_subjects = [], [], []
        for ctx in ("",) + tuple(p for p in self.context_prefixes if p):
            for p, s in zip(request.prompts, subjects):
                start, end = subject_span(p, s)
                text = ctx + p
                span = (start + len(ctx), end + len(ctx))
                prompts.append(text)
                positions.append(last_token_index(tok, text, span))
                row_subjects.append(s)
        n_ctx = len(prompts) // len(request.prompts)
        targets = None if request.targets is None else list(request.targets) * n_ctx
        req = DeletionRequest(prompts, list(request.answers) * n_ctx, [], targets, row_subjects)
        prep = prepare(model, objective, req, retain=False)
        subject = subjects[0].strip()
        if self.kl_factor:
            kl_text = self.kl_prompt.format(subject)
            i = self.kl_prompt.find("{}")
            prep.rows.append(tokenize(tok, kl_text))
            positions.append(last_token_index(tok, kl_text, (i, i + len(subject))))

        n_sub = len(prep.rows)  # rows whose subject's last token gets delta (deletion + essence)
        retain = [tokenize(tok, p) for p in request.retain_prompts] if self.retain_weight else []
        prep.rows.extend(retain)

        # key k* (mean over rows), the plain prompt's key k and v_init = W k (+ bias)
        with torch.no_grad():
            rows = [tokenize(tok, p) for p in prompts]
            # image prompts: positions counted in the expanded sequence the language model sees
            positions[:len(rows)] = [expanded_position(model, r, q) for r, q in zip(rows, positions)]
            batch = encode_ids(model, rows)
            cols = batch.seq_len - batch.lengths + torch.tensor(positions[:len(rows)], device=batch.lengths.device)
            ridx = torch.arange(len(rows), device=cols.device)
            with model.nn.trace(**batch.model_inputs()) as tracer:
                keys = env.input[ridx, cols].save()
                vals = env.output[ridx, cols].save()
                tracer.stop()
        keys, vals = keys.float(), vals.float()
        k_star, k_plain, v_init = keys.mean(0), keys[0], vals[0]

        # the update's left vector: u = (C + lambda I)^-1 k*, scaled so that u . k = 1
        mom2 = self.covariance(model, layer, session.param_name).double()
        ridge = self.mom2_ridge * mom2.diagonal().mean()
        eye = torch.eye(mom2.shape[0], dtype=mom2.dtype, device=mom2.device)
        u = torch.linalg.solve(mom2 + ridge * eye, k_star.double().to(mom2.device)).to(v_init.device)
        u = u / (u @ k_plain.double())
        u32 = u.float()

        # v* optimisation
        delta = torch.zeros_like(v_init, requires_grad=True)
        pos_t = torch.tensor(positions, device=model.device)

        def add_delta(b):
            # rows < n_sub: delta at the subject's last token (ROME); retain rows: the final update's
            # exact effect, delta * (u . k_t) at every token t
            exact = self.v_exact
            k_in = env.input if (retain or exact) else None
            out = env.output
            coef = torch.zeros(out.shape[0], out.shape[1], 1, device=out.device, dtype=torch.float32)
            first = 0 if exact else n_sub
            if not exact:
                c = b.seq_len - b.lengths[:n_sub] + pos_t
                coef[torch.arange(n_sub, device=out.device), c] = 1.0
            if k_in is not None and first < out.shape[0]:
                coef[first:] = (k_in[first:].float() @ u32)[..., None] * b.attention_mask[first:, :, None]
            env.output = out + (coef * delta).to(out.dtype)

        retain_ref = None
        if retain:
            with torch.no_grad():  # delta = 0: the unedited model
                _, ref = objective_forward(model, prep)
            retain_ref = ref[n_sub - prep.n_del:]
        stop = self._stop(objective)
        opt = torch.optim.Adam([delta], lr=self.v_lr)
        max_norm = self.clamp_norm_factor * v_init.norm()
        v_norm2 = v_init.norm() ** 2
        kl_ref = [None]
        n_ess = n_sub - prep.n_del

        def loss(step: int) -> StepLoss:
            inputs, extra_lp = objective_forward(model, prep, intervene=add_delta)
            obj = objective.loss(inputs)
            obj_val = float(obj.detach())
            total = obj + self.v_weight_decay * delta.norm() / v_norm2
            if n_ess:
                if kl_ref[0] is None:  # delta = 0 on the first pass: the unedited distribution
                    kl_ref[0] = extra_lp[:n_ess].detach()
                total = total + self.kl_factor * torch.nn.functional.kl_div(
                    kl_ref[0], extra_lp[:n_ess], log_target=True, reduction="batchmean")
            kl = None
            if retain_ref is not None:
                kl_t = retain_kl(extra_lp[n_ess:], retain_ref)
                kl = float(kl_t.detach())
                total = total + self.retain_weight * kl_t
            return StepLoss(total, obj_val, kl)

        def update() -> None:
            opt.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())

        # the reference code's last pass only measures for ROME's own target loss (empty response,
        # error injection); for the deletion objectives all v_steps passes update (R-TXT compute_v.py)
        steps = Steps(self.v_steps, loss, update, [delta], opt, stop=stop,
                      measure_last=objective.target_kind == "target")
        with only_trainable(model, []), torch.enable_grad():
            yield steps

        # rank-one update: W <- W + delta u^T / (u^T k)   (u already scaled so that u . k = 1)
        d = delta.detach().double()
        if not bool(torch.isfinite(d).all()):
            raise EditFailed("v* optimisation produced a non-finite delta")
        upd = torch.outer(d, u.to(d.device))  # [d_out, d_in]
        if _is_conv1d(module):
            upd = upd.T  # Conv1D stores the weight as [d_in, d_out]
        param = session.param
        with torch.no_grad():
            param.copy_((param.double() + upd).to(param.dtype))
        steps.extra.update(delta_norm=float(delta.detach().norm()), v_init_norm=float(v_init.norm()))
