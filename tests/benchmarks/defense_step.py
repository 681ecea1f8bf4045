"""Benchmark: one defense optimisation step with a hidden-state loss, ours vs plain PyTorch.

Ours: :func:`defenses.forward.objective_forward` (one nnsight trace reading the residual stream at
5 defense layers with gradients) + the head-projection defense loss + backward + Adam step on one
MLP down projection. Plain PyTorch: the same step with the hidden states from
``output_hidden_states=True`` (transformers' own forward, no nnsight), the same lens and loss.
Target: ours <= 1.3x plain. The last line printed is one JSON object.

    .venv/bin/python tests/benchmarks/defense_step.py [--model M] [--steps 20] [--retain 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import defenses  # noqa: E402
from probe.model import only_trainable  # noqa: E402
from defenses.forward import objective_forward, prepare  # noqa: E402
from defenses.objectives import head_projection_loss  # noqa: E402
from probe import load_model  # noqa: E402
from probe.facts import Fact  # noqa: E402
from probe.lens import lens_logits  # noqa: E402
from probe.tokens import encode_ids  # noqa: E402

RETAIN = ["The capital of Japan is", "The Eiffel Tower is in", "Water is made of hydrogen and",
          "The largest planet is"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--retain", type=int, default=4)
    args = ap.parse_args()
    model = load_model(args.model)
    n = model.n_layers
    layers = list(range(n - 5, n))
    obj = defenses.make_objective("head-projection", defense_layers=layers, margin=0.5)
    fact = Fact("fr", "The capital of France is", "Paris")
    req = obj.request(fact, [fact], RETAIN[: args.retain])
    ed = defenses.make_editor("constrained-ft")
    sess = ed.session(model)
    param = sess.param
    prep = prepare(sess.model, obj, req)
    opt = torch.optim.Adam([param], lr=1e-5)

    def ours():
        opt.zero_grad(set_to_none=True)
        inputs, _ = objective_forward(sess.model, prep)
        obj.loss(inputs).backward()
        opt.step()

    batch = encode_ids(sess.model, prep.rows)
    s_len = torch.tensor([len(s) for s in prep.seq_ids])
    last = batch.seq_len - s_len
    ridx = torch.arange(prep.n_del)

    def plain():
        opt.zero_grad(set_to_none=True)
        out = sess.model.hf(**batch.model_inputs(), output_hidden_states=True, logits_to_keep=int(s_len.max()))
        hs = torch.stack([out.hidden_states[i + 1][: prep.n_del][ridx, last] for i in layers], 1)
        torch.log_softmax(out.logits.float(), -1)  # the answer log-probs ours also computes
        head_projection_loss(lens_logits(sess.model, hs), prep.answer_first, obj.k, obj.margin, obj.bottom).backward()
        opt.step()

    times = {"ours": [], "plain": []}
    with only_trainable(sess.model, [param]), torch.enable_grad():
        for fn in (ours, plain):  # warm-up
            fn()
        for _ in range(args.steps):
            for name, fn in (("ours", ours), ("plain", plain)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    sess.restore()
    o, p = statistics.median(times["ours"]), statistics.median(times["plain"])
    print(f"model {model.name}: {n} layers, head-projection defense loss over layers {layers}, "
          f"{prep.n_del} deletion + {len(prep.rows) - prep.n_del} retain prompts, median of {args.steps} steps")
    print(f"ours (nnsight trace)       {o * 1000:8.1f} ms/step")
    print(f"plain PyTorch (hidden st.) {p * 1000:8.1f} ms/step")
    print(f"ratio ours/plain           {o / p:8.2f}  (target <= 1.3)")
    print(json.dumps({"ours_s": round(o, 5), "plain_pytorch_s": round(p, 5), "ratio": round(o / p, 3)}))


if __name__ == "__main__":
    main()
