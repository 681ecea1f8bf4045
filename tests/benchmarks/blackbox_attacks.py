"""Benchmark: seconds per fact of the blackbox and relearning attacks on SmolLM2-135M.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python tests/benchmarks/blackbox_attacks.py [--n 3]

Attacks the first ``--n`` built-in facts (undeleted model) with question-rephrase, jailbreak and
relearning (unrelated data; with and without the question-rephrase pass on the relearned copy)
at their default settings, and prints seconds per fact and attack success.
"""

from __future__ import annotations

import argparse
import time

import probe
from attacks.base import AttackContext
from attacks.blackbox import Jailbreak, QuestionRephrase
from attacks.relearning import Relearning
from probe.facts import load_facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = probe.load_model(args.model)
    facts = load_facts()
    todo = facts[: args.n]
    ctx = AttackContext(facts=facts, deleted=frozenset(f.id for f in todo), seed=0)
    for attack in (QuestionRephrase(), Jailbreak(), Relearning(rephrase=False), Relearning()):
        t = time.perf_counter()
        out = attack.run(model, todo, ctx)
        dt = (time.perf_counter() - t) / len(todo)
        label = attack.name + ("" if getattr(attack, "rephrase", True) else " (HP only)")
        print(f"{label:28s} {dt:6.2f} s/fact  success {sum(o.success for o in out)}/{len(out)}")


if __name__ == "__main__":
    main()
