"""Integration tests on the two real models: SmolLM2-135M (Llama-style) and Gemma-3-270M (Gemma:
embedding scaling, (1+w) RMSNorms, a BOS token, a 262k vocabulary)."""

from __future__ import annotations

import pytest
import torch

import probe
from attacks import AttackContext, attack_readout, evaluate_attacks, make_attack, summarize
from probe.facts import load_counterfact
from probe.tokens import encode

pytestmark = pytest.mark.real

PROMPTS = ["The capital of France is", "The Eiffel Tower is located in the city of",
           "Water is made of hydrogen and"]


@pytest.fixture(params=["smollm2", "gemma"], scope="module")
def real_model(request):
    return request.getfixturevalue(request.param)


def test_architecture_facts(smollm2, gemma):
    assert (smollm2.n_layers, smollm2.d_model, smollm2.vocab_size) == (30, 576, 49152)
    assert (gemma.n_layers, gemma.d_model, gemma.vocab_size) == (18, 640, 262144)
    assert type(smollm2.final_norm).__name__ == "LlamaRMSNorm"
    assert type(gemma.final_norm).__name__ == "Gemma3RMSNorm"
    # Gemma's tokenizer prepends BOS (id 2), SmolLM2's does not
    assert probe.encode(gemma, ["Paris"]).input_ids[0, 0].item() == 2
    assert probe.encode(smollm2, ["Paris"]).input_ids[0, 0].item() != smollm2.tokenizer.bos_token_id
    # tied embeddings share storage
    for m in (smollm2, gemma):
        assert m.unembed.weight.data_ptr() == m.module(m.arch.embed).weight.data_ptr()


def test_lens_final_matches_logits(real_model):
    """LENS-FINAL: the lens on the last layer reproduces the model's logits (fp32, <= 1e-4)."""
    resid = probe.residual_stream(real_model, PROMPTS)
    batch = encode(real_model, PROMPTS)
    with torch.no_grad():
        logits = real_model.hf(**batch.model_inputs()).logits[:, -1]
    diff = (probe.lens_logits(real_model, resid[:, -1]) - logits).abs().max().item()
    assert diff <= 1e-4
    logp = probe.logit_lens(real_model, resid)
    assert logp.shape == (3, real_model.n_layers, real_model.vocab_size)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, real_model.n_layers), atol=1e-4)


def test_batched_equals_unbatched(real_model):
    batched = probe.residual_stream(real_model, PROMPTS)
    single = torch.cat([probe.residual_stream(real_model, [p]) for p in PROMPTS])
    scale = single.abs().amax(dim=(0, 2), keepdim=True)
    assert ((batched - single).abs() / scale).max().item() < 1e-4


def test_known_fact_and_answer_ids(real_model):
    prompt = "The Eiffel Tower is located in the city of"
    ids = probe.answer_ids(real_model.tokenizer, prompt, "Paris")
    assert real_model.tokenizer.decode(ids) == " Paris"
    reads = attack_readout(real_model, [prompt], ["Paris"],
                           [make_attack("head-projection")])
    assert reads[0].rank[-1] == 1  # both models know it
    assert reads[0].attack_ranks["head-projection"] == 1
    # the logit lens is uninformative early and sharp at the end
    assert reads[0].rank[0] > 100


def test_whitebox_attacks_on_counterfact(real_model, counterfact_path):
    facts = load_counterfact(counterfact_path)[:48]
    attacks = [make_attack(n) for n in ("head-projection", "probability-delta", "pd2")]
    sweeps, outs = evaluate_attacks(real_model, facts, attacks, AttackContext())
    reads = sweeps["logit"]
    summ = {a.name: summarize(a, real_model.n_layers, outs[a.name]) for a in attacks}
    assert all(s.budget == 20 for s in summ.values())
    known = [i for i, r in enumerate(reads) if r.rank[-1] == 1]
    assert 5 <= len(known) < 48
    # head projection includes the last layer, so every known fact is found at B=20
    assert all(outs["head-projection"][i].best_rank == 1 for i in known)
    hp = summ["head-projection"]
    assert hp.success_pre >= len(known) / len(reads)
    assert hp.curve_pre == sorted(hp.curve_pre)  # success grows with the budget


def test_fact_erasure_on_smollm2(smollm2):
    from defenses import DeletionRequest, make_editor, make_objective
    from defenses.evaluate import deletion_scores, fact_probs
    from probe.facts import load_facts

    facts = load_facts()
    fact = next(f for f in facts if f.id == "bf-capital-france")
    before = {n: p.detach().clone() for n, p in smollm2.hf.named_parameters()}
    editor = make_editor("constrained-ft")
    session = editor.session(smollm2)
    pre = fact_probs(smollm2, [fact])[0]
    from defenses.retain import retain_prompts

    info = editor.edit(session, make_objective("fact-erasure"),
                       DeletionRequest([fact.prompt], [fact.answer], retain_prompts(fact, facts, 4, sim_frac=1.0)))
    post = fact_probs(session.model, [fact])[0]
    scores = deletion_scores(pre, post)
    assert scores["rewrite_score"] > 0.9
    assert 0 < info.max_abs_change <= editor.norm_bound + 1e-7
    session.restore()
    assert session.max_abs_change() == 0.0
    # the caller's model was never modified
    for n, p in smollm2.hf.named_parameters():
        assert torch.equal(p, before[n]), n
