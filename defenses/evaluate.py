"""Measuring a deletion: the probabilities a defense changes and the scores built on them."""

from __future__ import annotations

from typing import Sequence

import torch

from probe.facts import Fact
from probe.lens import LogitLens
from probe.results import FactProbs
from probe.readout import answer_rank, sequence_logprobs, teacher_forced, teacher_forced_inputs

from .metrics import generation_accuracy, mean, neighborhood_score, rewrite_score_erasure, rewrite_score_target


def fact_probs(model, facts: Sequence[Fact], *, accuracy: bool = True, max_new_tokens: int = 8,
               batch_size: int = 32) -> list[FactProbs]:
    """Batched :class:`FactProbs` for many facts (one pass over all prompts)."""
    prompts, answers, owners = [], [], []
    for i, f in enumerate(facts):
        prompts.append(f.prompt); answers.append(f.answer); owners.append((i, "prompt"))
        for p in f.paraphrases:
            prompts.append(p); answers.append(f.answer); owners.append((i, "para"))
        for n in f.neighborhood:
            prompts.append(n["prompt"]); answers.append(n["answer"]); owners.append((i, "neigh"))
    lps = sequence_logprobs(model, prompts, answers, batch_size=batch_size)
    out = [FactProbs(0.0, [], []) for _ in facts]
    for (i, kind), lp in zip(owners, lps):
        p = float(lp.sum().exp())
        if kind == "prompt":
            out[i].prompt = p
        elif kind == "para":
            out[i].paraphrases.append(p)
        else:
            out[i].neighbors.append(p)
    if accuracy:
        n_prompts = [n["prompt"] for f in facts for n in f.neighborhood]
        n_labels = [n["answer"] for f in facts for n in f.neighborhood]
        acc = generation_accuracy(model, n_prompts, n_labels, max_new_tokens=max_new_tokens) if n_prompts else []
        pos = 0
        for i, f in enumerate(facts):
            out[i].neighbor_acc = acc[pos:pos + len(f.neighborhood)]
            pos += len(f.neighborhood)
    return out


def target_probs(model, fact: Fact, target: str) -> list[float]:
    """p(target | x) (0..1, full sequence, teacher-forced) for the fact's prompt then each
    paraphrase: the quantity the target-form rewrite/paraphrase scores compare."""
    prompts = [fact.prompt, *fact.paraphrases]
    return [float(lp.sum().exp()) for lp in sequence_logprobs(model, prompts, [target] * len(prompts))]


def target_scores(pre: list[float], post: list[float]) -> dict:
    """Target-form scores (empty response, error injection): rewrite on the prompt, paraphrase
    averaged over paraphrases, ``max(2e-8, (p_post - p_pre) / (1 - p_pre))`` with p = p(target)."""
    return {"target_p_pre": pre[0], "target_p_post": post[0],
            "target_rewrite_score": rewrite_score_target(pre[0], post[0]),
            "target_paraphrase_score": mean([rewrite_score_target(a, b) for a, b in zip(pre[1:], post[1:])])}


def random_accuracy(model, facts: Sequence[Fact], *, max_new_tokens: int = 8) -> list[bool]:
    """Greedy-generation correctness on other facts' prompts (random Δ-Acc; UnLOK-VQA draws 10
    random items per edit, method.md section 5)."""
    if not facts:
        return []
    return generation_accuracy(model, [f.prompt for f in facts], [f.answer for f in facts],
                               max_new_tokens=max_new_tokens)


def deletion_scores(pre: FactProbs, post: FactProbs) -> dict:
    """Per-fact fact-erasure scores (see :mod:`defenses.metrics` for the formulas)."""
    d = {
        "p_pre": pre.prompt,
        "p_post": post.prompt,
        "rewrite_score": rewrite_score_erasure(pre.prompt, post.prompt),
        "paraphrase_score": mean([rewrite_score_erasure(a, b) for a, b in zip(pre.paraphrases, post.paraphrases)]),
        "neighborhood_score": mean([neighborhood_score(a, b) for a, b in zip(pre.neighbors, post.neighbors)]),
    }
    if pre.neighbor_acc is not None and post.neighbor_acc is not None and pre.neighbor_acc:
        d["neighborhood_acc_pre"] = sum(pre.neighbor_acc) / len(pre.neighbor_acc)
        d["neighborhood_acc_post"] = sum(post.neighbor_acc) / len(post.neighbor_acc)
        d["neighborhood_delta_acc"] = d["neighborhood_acc_pre"] - d["neighborhood_acc_post"]
    return d


def output_ranks(model, facts: Sequence[Fact], *, batch_size: int = 32) -> list[int]:
    """1-based rank of each fact's answer's first token at the model's output after its prompt: one
    batched forward pass per ``batch_size`` prompts, the last decoder layer's residual at the last
    prompt token decoded by the logit lens (fp32; ties count for the answer) -- the same number as
    ``rank[-1]`` of :func:`probe.readout.lens_readout` (the known-fact filter's readout), without
    decoding the other layers.

    Returns:
        One int per fact (1 = the model's top-1 next token).
    """
    out: list[int] = []
    last = model.n_layers - 1
    for start in range(0, len(facts), batch_size):
        chunk = facts[start:start + batch_size]
        rows, a_ids, p_len = teacher_forced_inputs(model.tokenizer, [f.prompt for f in chunk],
                                                   [f.answer for f in chunk])
        first = [[a[0]] for a in a_ids]
        with torch.no_grad():
            resid, _, _ = teacher_forced(model, [r[:n] for r, n in zip(rows, p_len)], first, layers=[last])
            logits = LogitLens.from_model(model)(resid[:, 0])  # [B, vocab] fp32
            target = torch.tensor([a[0] for a in first], device=logits.device)
            out.extend(int(r) for r in answer_rank(logits, target))
    return out


def retention_scores(pre: Sequence[bool], post: Sequence[bool]) -> dict:
    """Retention on the other known facts (parallel lists: is each fact's answer's first token the
    top-1 output before / after the edit): ``retention_acc_pre``, ``retention_acc_post`` (fractions),
    ``retention_drop`` = pre − post and ``retention_n``; empty without facts."""
    if not pre:
        return {}
    a_pre, a_post = sum(pre) / len(pre), sum(post) / len(post)
    return {"retention_acc_pre": a_pre, "retention_acc_post": a_post, "retention_drop": a_pre - a_post,
            "retention_n": len(pre)}


def generation_hits(model, facts: Sequence[Fact], *, max_new_tokens: int = 36, batch_size: int = 16) -> list[list[bool]]:
    """Per fact, whether the greedy ``max_new_tokens``-token continuation of its prompt, then of each
    paraphrase, contains the answer (:func:`generation_accuracy`; one batched, left-padded
    generation over every prompt of every fact).

    Returns:
        ``[[prompt hit, paraphrase 1 hit, ...] per fact]``.

    Raises:
        PromptTooLongError: a prompt plus ``max_new_tokens`` exceeds the model's context.
    """
    prompts, labels, sizes = [], [], []
    for f in facts:
        texts = [f.prompt, *f.paraphrases]
        prompts += texts
        labels += [f.answer] * len(texts)
        sizes.append(len(texts))
    hits = generation_accuracy(model, prompts, labels, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out, pos = [], 0
    for n in sizes:
        out.append([bool(h) for h in hits[pos:pos + n]])
        pos += n
    return out


def generation_scores(pre: Sequence[bool], post: Sequence[bool]) -> dict:
    """Generation-based deletion scores of one fact from :func:`generation_hits` before / after the
    edit (``[prompt, *paraphrases]`` each; formulas in :mod:`defenses.metrics`):
    ``generation_acc_pre``, ``generation_efficacy`` (None when the unedited model did not generate
    the answer), ``generation_paraphrase_acc_pre`` (None without paraphrases) and
    ``generation_paraphrase_efficacy`` (None when no paraphrase's unedited continuation had it).

    Raises:
        ValueError: ``pre`` and ``post`` differ in length.
    """
    if len(pre) != len(post) or not pre:
        raise ValueError(f"generation hits before ({len(pre)}) and after ({len(post)}) the edit must match, "
                         "prompt first")
    known_paras = [b for a, b in zip(pre[1:], post[1:]) if a]
    return {"generation_acc_pre": float(pre[0]),
            "generation_efficacy": float(not post[0]) if pre[0] else None,
            "generation_paraphrase_acc_pre": sum(pre[1:]) / len(pre[1:]) if len(pre) > 1 else None,
            "generation_paraphrase_efficacy": (sum(not b for b in known_paras) / len(known_paras)
                                               if known_paras else None)}
