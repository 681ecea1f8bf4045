"""Benchmark: train the tuned lens of a real model and compare it with the logit lens, per layer.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=2 .venv/bin/python tests/benchmarks/tuned_lens_kl.py [--model smollm2-135m] [--minutes 8]
        [--facts ../shared/data/counterfact_filtered.json --n-facts 200] [--save] [--exclude-facts FILE]

Trains with :func:`probe.lens_training.train_tuned_lens` (default training text: Python's own
documentation, filtered against the built-in facts and the ``--exclude-facts`` file, by default
CounterFact from ``../shared/data`` when it exists; see :func:`probe.corpus.default_texts`) and prints
the per-layer held-out KL(p_final || p_lens) in nats of the logit lens and of the tuned lens, and
the wall time (model load excluded; ``train_s`` is the whole training call, collection and both
evaluations included). With ``--facts`` it also reads the first ``--n-facts`` facts with both
lenses and prints, per layer, the median answer rank and top-4 hit rate, and attack success@20 of
Head Projection on the logit lens (its default layers) and of the ``tuned-lens`` attack (its
default layers). ``--save`` writes the lens into the cache (``cache_dir()/tuned-lens``), where
:func:`probe.lens_training.get_tuned_lens` and the attack find it.

The last line printed is one JSON object: ``train_s``, ``kl_logit``, ``kl_tuned`` (lists, nats),
``tuned_below_logit_all_layers`` (every layer but the last, where both are 0 by construction),
the phase timings, token counts, torch threads and, with ``--facts``, the attack numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import probe  # noqa: E402
from probe import lens_training as lt  # noqa: E402
from probe.facts import load_facts  # noqa: E402

COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact_filtered.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--facts", default=None, help="also compare the lenses on these facts (CounterFact JSON or JSONL)")
    ap.add_argument("--n-facts", type=int, default=200)
    ap.add_argument("--save", action="store_true", help="save the lens into the tuned-lens cache")
    ap.add_argument("--exclude-facts", default=str(COUNTERFACT) if COUNTERFACT.is_file() else None,
                    help="facts kept out of the training text besides the built-in ones (default: CounterFact "
                         "from ../shared/data when present; '' for none)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    model = probe.load_model(args.model)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    exclude = load_facts(args.exclude_facts) if args.exclude_facts else []
    lens, rep = lt.train_tuned_lens(model, minutes=args.minutes, steps=args.steps, seed=args.seed,
                                    progress=not args.quiet, exclude=exclude)
    train_s = time.perf_counter() - t
    print(rep.table())
    print(f"model load {load_s:.1f} s; training (all phases) {train_s:.1f} s = {train_s / 60:.2f} min; "
          f"torch threads {torch.get_num_threads()}; phases {rep.seconds}")
    below = all(b < a for a, b in zip(rep.kl_logit[:-1], rep.kl_tuned[:-1]))
    out = {"model": model.name, "fingerprint": model.fingerprint, "train_s": round(train_s, 1),
           "load_s": round(load_s, 1), "torch_threads": torch.get_num_threads(),
           "kl_logit": [round(x, 4) for x in rep.kl_logit], "kl_tuned": [round(x, 4) for x in rep.kl_tuned],
           "tuned_below_logit_all_layers": below, "phases_s": rep.seconds, "steps": rep.steps,
           "n_train_tokens": rep.n_train_tokens, "n_adam_tokens": rep.n_adam_tokens,
           "n_heldout_tokens": rep.n_heldout_tokens, "text_source": rep.text_source}
    if args.save:
        out["saved"] = str(lens.save(lt.lens_path(model)))
    if args.facts:
        out.update(compare_on_facts(model, lens, args.facts, args.n_facts))
    print(json.dumps(out))
    return 0 if below else 1


def compare_on_facts(model, lens, path: str, n: int) -> dict:
    """Per-layer median rank / top-4 rate of the answer under both lenses, and success@20 of
    logit-lens Head Projection vs the tuned-lens attack, on the first ``n`` facts."""
    from probe.layers import spread_layers
    from attacks import HeadProjection
    from probe.facts import load_facts
    from probe.readout import lens_readout

    facts = load_facts(path)[:n]
    prompts, answers = [f.prompt for f in facts], [f.answer for f in facts]
    t = time.perf_counter()
    logit = lens_readout(model, prompts, answers)
    tuned = lens_readout(model, prompts, answers, lens=lens, desc="tuned lens")
    read_s = time.perf_counter() - t
    L = model.n_layers
    print(f"{len(facts)} facts from {path}: per layer median answer rank / top-4 rate")
    print(f"{'layer':>5}  {'logit rank':>10}  {'tuned rank':>10}  {'logit top4':>10}  {'tuned top4':>10}")
    med_l, med_t = [], []
    for layer in range(L):
        rl = [r.rank[layer] for r in logit]
        rt = [r.rank[layer] for r in tuned]
        med_l.append(statistics.median(rl))
        med_t.append(statistics.median(rt))
        print(f"{layer:5d}  {med_l[-1]:10.0f}  {med_t[-1]:10.0f}  {sum(r <= 4 for r in rl) / len(rl):10.2f}  "
              f"{sum(r <= 4 for r in rt) / len(rt):10.2f}")
    hp_layers = HeadProjection().resolve_layers(L)
    tl_layers = spread_layers(L, 5, span_frac=0.5)
    hp = sum(min(r.rank[i] for i in hp_layers) <= 4 for r in logit) / len(logit)
    tlk = sum(min(r.rank[i] for i in tl_layers) <= 4 for r in tuned) / len(tuned)
    known = [i for i, r in enumerate(logit) if r.rank[-1] == 1]
    hp_known = sum(min(logit[i].rank[j] for j in hp_layers) <= 4 for i in known) / max(1, len(known))
    tl_known = sum(min(tuned[i].rank[j] for j in tl_layers) <= 4 for i in known) / max(1, len(known))
    print(f"success@20: head-projection (logit lens, layers {hp_layers}) {hp:.3f}; tuned-lens (layers {tl_layers}) "
          f"{tlk:.3f}; on the {len(known)} known facts (rank 1 at the output): {hp_known:.3f} vs {tl_known:.3f}")
    return {"n_facts": len(facts), "readout_s": round(read_s, 1), "median_rank_logit": med_l,
            "median_rank_tuned": med_t,
            "success20_head_projection": hp, "success20_tuned_lens": tlk, "n_known": len(known),
            "success20_head_projection_known": hp_known, "success20_tuned_lens_known": tl_known}


if __name__ == "__main__":
    raise SystemExit(main())
