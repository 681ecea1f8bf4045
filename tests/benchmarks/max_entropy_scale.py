"""Max-entropy on the reference's loss scale vs the old one (issue 12 item 7), on SmolLM2.

Edits the first ``--n`` built-in facts one at a time with the max-entropy objective and its default
constrained-FT settings (``defenses.editor_for``; retain: 4 leak-free prompts, ``sim_frac=1.0`` as
the jobs), twice: with the shipped loss (minus the mean lens entropy in nats,
:func:`defenses.objectives.neg_mean_entropy`) and with the old one (the normalised entropy gap,
1 + loss / log V). Adam is invariant to a constant loss scale, so the two differ only through the
balance with the KL retain term. Prints, per fact and scale: the mean lens entropy (nats) at the
defense layers before / after, the answer's logit-lens rank at each defense layer before / after,
the model's first-token p(answer) before / after, the retain KL (nats, mean over the retain
prompts' next-token distributions) after, and the steps.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/max_entropy_scale.py --n 1
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    import defenses
    from defenses.objectives import MaxEntropy, neg_mean_entropy
    from defenses.retain import retain_prompts
    from probe import load_model
    from probe.facts import load_facts
    from probe.lens import logit_lens
    from probe.readout import last_token_logprobs, lens_readout
    from probe.residual import residual_stream

    @dataclass
    class OldScale(MaxEntropy):
        def loss(self, inputs):
            return 1 + neg_mean_entropy(inputs.lens_logits) / math.log(inputs.lens_logits.shape[-1])

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = load_model(args.model)
    facts = load_facts(None)
    torch.manual_seed(0)

    def measure(m, fact, layers, retain):
        with torch.no_grad():
            lp = logit_lens(m, residual_stream(m, [fact.prompt], layers))[0]  # [L, V]
            ent = float(-(lp.exp() * lp).sum(-1).mean())
        r = lens_readout(m, [fact.prompt], [fact.answer])[0]
        ret = last_token_logprobs(m, retain) if retain else None
        return ent, [r.rank[i] for i in layers], r.first_token_prob, ret

    for fact in facts[:args.n]:
        retain = retain_prompts(fact, facts, 4, sim_frac=1.0)
        for label, obj in (("new (nats)", MaxEntropy()), ("old (/ln V)", OldScale())):
            layers = obj.layers(model.n_layers)
            ed = defenses.editor_for(obj, "constrained-ft")
            ent0, rank0, p0, ret0 = measure(model, fact, layers, retain)
            sess = ed.session(model)
            info = ed.edit(sess, obj, obj.request(fact, facts, retain))
            ent1, rank1, p1, ret1 = measure(sess.model, fact, layers, retain)
            kl = float((ret0.exp() * (ret0 - ret1)).sum(-1).mean())
            sess.restore()
            print(f"{fact.id} [{label}] layers {layers} | entropy {ent0:.3f} -> {ent1:.3f} nats "
                  f"(log V {math.log(model.vocab_size):.3f}) | rank {rank0} -> {rank1} "
                  f"| p(answer) {p0:.3f} -> {p1:.3f} "
                  f"| retain KL {kl:.4f} | steps {info.steps}, loss {info.losses[0]:.4f} -> {info.losses[-1]:.4f} "
                  f"| {dict(ed.config()) if hasattr(ed, 'config') else ''}")
        print(f"  retain: {retain}")


if __name__ == "__main__":
    main()
