"""Write the CounterFact facts that two models both know (answer's first token at rank 1) as JSONL.

Used to compare SmolLM2-135M and Gemma-3-270M on the same facts (the multimodal paper's claim that
larger models are more robust after editing).

    .venv/bin/python tests/benchmarks/common_known.py --models smollm2-135m,gemma-3-270m --out common.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COUNTERFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact_filtered.json"


def main() -> None:
    import attacks
    from probe import load_model
    from probe.facts import load_facts

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma-3-270m")
    ap.add_argument("--facts", default=str(COUNTERFACT))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    facts = load_facts(args.facts)
    known = None
    for name in args.models.split(","):
        model = load_model(name)
        reads = attacks.attack_readout(model, [f.prompt for f in facts], [f.answer for f in facts], [])
        ids = {f.id for f, r in zip(facts, reads) if r.rank[-1] <= 1}
        print(f"{name}: {len(ids)} of {len(facts)} facts known", flush=True)
        known = ids if known is None else known & ids
        del model
    both = [f for f in facts if f.id in known]
    Path(args.out).write_text("".join(json.dumps(f.to_json()) + "\n" for f in both), encoding="utf-8")
    print(f"known by all: {len(both)} -> {args.out}")
    print(json.dumps({"n_common": len(both)}))


if __name__ == "__main__":
    main()
