"""Issue 11 item 10: the fair linear probe on the real SmolLM2 reads more than its relation prior
at late layers, and not at layer 0 (values pinned, measured on CPU fp32).

Set: CounterFact relation P103 ("The mother tongue of {person} is"), 185 facts; every 4th fact is
attacked (= deleted, never trained on), the probes train on the other 139. P103 is chosen because
its answer never occurs in the prompt (unlike P176/P178, where "Honda Civic -> Honda" lets a probe
copy the subject) and its prior is strong (French: ~70%), so a positive excess means the hidden state
says which language, beyond the answer frequencies. k = 1 and one layer: the probe's candidate set
and the prior's both have exactly one answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from attacks import AttackContext, summarize
from attacks.linear_probe import LinearProbeAttack
from probe.facts import load_counterfact

pytestmark = pytest.mark.real


def test_probe_excess_over_relation_prior_on_unedited_smollm2(smollm2, counterfact_path):
    facts = [f for f in load_counterfact(counterfact_path) if f.relation == "P103"]
    attacked = facts[::4]
    ctx = AttackContext(facts=facts, deleted=frozenset(f.id for f in attacked))
    attack = LinearProbeAttack(layers=[24], k=1, rank_layers="all")
    out = attack.run(smollm2, attacked, ctx)
    s = summarize(attack, smollm2.n_layers, out)
    kept = [o for o in out if not o.skipped]
    # measured: 47 attacked, 3 skipped (answers with < 2 of the 139 training facts), 44 scored
    assert (len(out), s.n_skipped, s.n_facts) == (47, 3, 44) and s.control == "relation prior"
    assert all(o.details["n_train"] <= 139 and not o.details["answer_in_prompt"] for o in kept)
    # measured: prior top-1 (French) 31/44 = 0.705; probe at layer 24: 42/44 = 0.955 -> excess 0.25
    assert s.success_control_pre == pytest.approx(31 / 44, abs=0.03)
    assert s.excess == pytest.approx(0.25, abs=0.07) and s.excess > 0.15
    prior_top1 = np.mean([o.control_rank == 1 for o in kept])

    def excess_at(layer: int) -> float:
        return float(np.mean([o.layer_ranks[layer] == 1 for o in kept]) - prior_top1)

    # every late layer beats the prior (measured 0.27-0.30 at 23-29); layer 0 does not (-0.045)
    assert min(excess_at(layer) for layer in range(23, 30)) > 0.15
    assert -0.12 <= excess_at(0) <= 0.05
