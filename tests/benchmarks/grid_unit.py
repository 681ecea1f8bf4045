"""Benchmark: one grid unit (one fact through one defense, every default grid attack and metric)
against its floor, plain PyTorch doing the same numbers of tokens and steps.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/grid_unit.py [--facts 3] [--defense fact-erasure] [--attacks ...]

What is timed (``unit_s``): for each of ``--facts`` known CounterFact facts, the pre measurement
(:func:`probe.jobs.deletion.measure_pre`: every attack on the unedited model, probabilities,
random Δ-Acc draw, generation) and one (fact, defense) unit (:meth:`probe.jobs.grid.UnitContext.unit`:
the edit, every attack and score after it, the retention sweep over every other known fact) --
what ``probe-attack grid`` does per fact and defense, divided by the number of facts. The known-fact
filter is done once, untimed.

The floor (``unit_floor_s``): while the unit runs, global module hooks record every forward
through the model or any copy of it -- batch size, new tokens, and the first decoder layer whose
output needed gradients (none: a gradient-free call); a one-token call after a gradient-free call
of the same batch is a generation step. The floor then replays those shapes with plain PyTorch on the same model
(random token ids; no nnsight, no lens, no scoring, no Python between calls): a ``torch.no_grad``
forward for each gradient-free call, forward + ``backward`` on the summed last-position logits for
each call with gradients (``logits_to_keep=1`` throughout: the floor unembeds one position per row,
at most what the unit needs) (the same parameters left trainable as in the unit: one MLP weight for constrained FT),
and ``generate`` with the same batch, prompt length and number of new tokens (greedy, no early stop)
for each run of cached decoding calls. Cached decoding is replayed as whole ``generate`` calls so
its per-token overhead counts in the floor too.

Target (issue 13): ``unit_s`` <= 1.3x ``unit_floor_s``. The last line printed is one JSON object
(``unit_s``, ``unit_floor_s``, ``ratio``, the recorded call counts and tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact_filtered.json"

import probe  # noqa: E402
from probe.facts import load_counterfact  # noqa: E402
from probe.jobs import GRID_ATTACKS, GridConfig  # noqa: E402
from probe.jobs.deletion import attack_context, build_plan, known_facts, measure_pre  # noqa: E402
from probe.jobs.grid import UnitContext  # noqa: E402
from probe.model import get_attr_path  # noqa: E402


class Recorder:
    """Global module hooks (every copy of the model counts: edits and relearning run on clones):
    one record per forward through the model, ``[batch, new_tokens, first trainable layer or
    None]``, started by the token embedding (its input ids give batch and new tokens) and completed
    by the decoder layers (the first whose output requires grad; None = no gradients)."""

    def __init__(self, model):
        self.emb_cls = type(model.hf.get_input_embeddings())
        self.layer_cls = type(get_attr_path(model.hf, model.arch.layers)[0])
        self.calls: list[list] = []
        self.layer = 0
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self.pre),
                        torch.nn.modules.module.register_module_forward_hook(self.post)]

    def pre(self, module, args):
        if type(module) is self.emb_cls and args and args[0].dim() == 2:
            self.calls.append([int(args[0].shape[0]), int(args[0].shape[1]), None])
            self.layer = 0

    def post(self, module, args, output):
        if type(module) is self.layer_cls and self.calls:
            out = output[0] if isinstance(output, tuple) else output
            if self.calls[-1][2] is None and getattr(out, "requires_grad", False):
                self.calls[-1][2] = self.layer
            self.layer += 1

    def close(self):
        for h in self.handles:
            h.remove()


def segments(calls):
    """Group the records: a one-token call right after a gradient-free call of the same batch
    continues a generation. Returns ``[("forward", B, T, first trainable layer | None) |
    ("generate", B, prompt_len, new_tokens)]``."""
    out = []
    for b, t, first in calls:
        if t == 1 and first is None and out and out[-1][1] == b and (out[-1][0] == "generate" or out[-1][3] is None):
            if out[-1][0] == "generate":
                out[-1] = ("generate", b, out[-1][2], out[-1][3] + 1)
            else:
                _, bb, plen, _ = out.pop()
                out.append(("generate", bb, plen, 2))  # the prompt's forward made the first token
        else:
            out.append(("forward", b, t, first))
    return out


def replay(model, segs) -> float:
    """Plain PyTorch over the recorded shapes (see the module docstring); seconds. A call with
    gradients is replayed as forward + backward with one weight trainable, the MLP output weight of
    the first layer that had trainable parameters in the unit (so backward runs as deep as the
    unit's did; an approximation for LoRA's many small adapters)."""
    hf = model.hf
    vocab = model.vocab_size
    layers = get_attr_path(hf, model.arch.layers)
    g = torch.Generator().manual_seed(0)
    saved = {n: p.requires_grad for n, p in hf.named_parameters()}
    hf.requires_grad_(False)
    try:
        t0 = time.perf_counter()
        for seg in segs:
            if seg[0] == "forward":
                _, b, t, first = seg
                ids = torch.randint(0, vocab, (b, t), generator=g).to(model.device)
                if first is not None:
                    w = get_attr_path(layers[first], model.arch.mlp_out).weight
                    w.requires_grad_(True)
                    hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float().sum().backward()
                    w.grad = None
                    w.requires_grad_(False)
                else:
                    with torch.no_grad():
                        hf(input_ids=ids, use_cache=False, logits_to_keep=1)
            else:
                _, b, plen, new = seg
                ids = torch.randint(0, vocab, (b, plen), generator=g).to(model.device)
                with torch.no_grad():
                    hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0
    finally:
        for n, p in hf.named_parameters():
            p.requires_grad_(saved[n])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=3, help="known facts to time (default 3)")
    ap.add_argument("--defense", default="fact-erasure")
    ap.add_argument("--attacks", default=",".join(GRID_ATTACKS), help="default: the grid's default attacks")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = probe.load_model()
    facts = load_counterfact(args.data)
    cfg = GridConfig(defenses=[args.defense], attacks=args.attacks.split(","), max_facts=args.facts, progress=False)
    plan = build_plan(model, cfg.attacks, cfg.defenses, cfg)
    plan.pool = facts
    pre_ctx = attack_context(plan, [], cfg)
    known, n_known = known_facts(model, facts, plan, cfg, pre_ctx)
    pre_ctx.deleted = frozenset(f.id for f, _, _ in known)
    units = UnitContext(plan, cfg, facts, pre_ctx.deleted)
    print(f"{len(known)} facts ({n_known} known), defense {args.defense}, attacks {args.attacks}, "
          f"{torch.get_num_threads()} threads", flush=True)

    rec = Recorder(model)
    trainable: set[str] = set()
    t0 = time.perf_counter()
    try:
        for fact, read, lens_out in known:
            pre = measure_pre(model, fact, read, lens_out, plan, pre_ctx, cfg)
            unit = units.unit(model, fact, pre, args.defense)
            if unit.edit is not None:
                trainable.add(unit.edit.parameter)
    finally:
        unit_total = time.perf_counter() - t0
        rec.close()
    segs = segments(rec.calls)
    floor_total = replay(model, segs)
    n = len(known)
    fwd = [s for s in segs if s[0] == "forward"]
    result = {"unit_s": round(unit_total / n, 3), "unit_floor_s": round(floor_total / n, 3),
              "ratio": round(unit_total / floor_total, 3), "facts": n, "defense": args.defense,
              "attacks": args.attacks.split(","), "threads": torch.get_num_threads(),
              "calls": len(rec.calls), "forward_calls": len(fwd), "grad_calls": sum(s[3] is not None for s in fwd),
              "generate_calls": len(segs) - len(fwd),
              "forward_tokens": sum(s[1] * s[2] for s in fwd),
              "generated_tokens": sum(s[1] * s[3] for s in segs if s[0] == "generate"),
              "trainable": sorted(trainable)}
    print(f"unit {result['unit_s']:.2f}s per fact, floor {result['unit_floor_s']:.2f}s: ratio {result['ratio']:.2f} "
          f"(target <= 1.3)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
