"""Measuring a deletion: the probabilities a defense changes and the scores built on them."""

from __future__ import annotations

from typing import Sequence

from probe.facts import Fact
from probe.results import FactProbs
from probe.readout import sequence_logprobs

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
