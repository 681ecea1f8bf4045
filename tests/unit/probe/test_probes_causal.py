"""Linear probes (probe.probes), the linear-probe attack's default layers, causal tracing
(probe.causal) and the layer-wise / causal-trace figures (viz.layers). The linear-probe attack itself:
``tests/unit/attacks/test_linear_probe.py``.

Probes are tested on synthetic residuals with a planted linear signal; causal tracing on tiny
random models (exact consistency checks) and once on the real SmolLM2.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from probe.layers import spread_layers
from probe.causal import (CAUSAL_TRACE, CausalTrace, _clean_run, _positions_by_decoding, causal_trace,
                          restored_probs, subject_embedding_std, subject_token_positions, trace_fact, trace_input)
from probe.errors import InputError
from probe.facts import Fact
from probe.probes import UNRANKED, cross_validated_accuracy, probe_dataset, train_probes
from probe.tokens import answer_ids, tokenize

ANSWERS = ["Paris", "Tokyo", "Rome", "Berlin", "Madrid"]


def planted(n_per_class=30, n_layers=5, d=24, layer=2, seed=0, strength=4.0):
    """Synthetic residuals: class-dependent means at ``layer`` only, pure noise elsewhere."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(len(ANSWERS), d))
    labels = [a for a in ANSWERS for _ in range(n_per_class)]
    X = rng.normal(size=(len(labels), n_layers, d)).astype(np.float32)
    for i, a in enumerate(labels):
        X[i, layer] += strength * means[ANSWERS.index(a)]
    return X, labels, means


# ------------------------------------------------------------------------------------------
# probes


def test_cv_accuracy_finds_planted_layer():
    X, y, _ = planted()
    cv = cross_validated_accuracy(X, y, folds=5)
    assert cv.stratified and cv.folds == 5 and cv.n == 150 and cv.n_classes == 5
    assert cv.chance == pytest.approx(0.2) and cv.majority in ANSWERS
    acc = np.array(cv.accuracy)
    assert acc[2] > 0.95
    others = np.delete(acc, 2)
    assert (others < 0.4).all(), acc  # chance = 0.2; 150 samples -> well below 0.4
    assert json.loads(json.dumps(cv.to_json()))["accuracy"] == cv.accuracy


def test_train_probes_rank_and_rare_answers():
    X, y, means = planted()
    X = np.concatenate([X, np.random.default_rng(1).normal(size=(1, 5, 24)).astype(np.float32)])
    y = y + ["Lisbon"]  # a single example: dropped
    probes = train_probes(X, y, layers=[10, 11, 12, 13, 14])
    assert probes.classes == sorted(ANSWERS) and probes.dropped == {"Lisbon": 1} and probes.n_train == 150
    assert probes.layers == [10, 11, 12, 13, 14]
    # new examples of each class: rank 1 at the planted layer
    rng = np.random.default_rng(7)
    X_new = rng.normal(size=(5, 5, 24)).astype(np.float32)
    X_new[:, 2] += 4.0 * means
    ranks = probes.rank(X_new, ANSWERS)
    assert ranks.shape == (5, 5) and ranks.dtype == np.int64
    assert (ranks[:, 2] == 1).all()
    assert ((ranks >= 1) & (ranks <= 5)).all()
    # not a class -> UNRANKED everywhere; a single answer string broadcasts
    assert (probes.rank(X_new, "Lisbon") == UNRANKED).all()
    assert (probes.rank(X_new[:1], " Paris ")[0] == ranks[0]).all()
    p = probes.predict_proba(X_new)
    assert p.shape == (5, 5, 5) and np.allclose(p.sum(-1), 1)
    assert list(probes.predict(X_new)[:, 2]) == ANSWERS
    with pytest.raises(ValueError):
        probes.rank(X_new[:, :3], ANSWERS)
    with pytest.raises(ValueError):
        probes.rank(X_new, ANSWERS[:2])
    # deterministic (fixed seed)
    again = train_probes(X, y, layers=[10, 11, 12, 13, 14])
    assert np.array_equal(again.predict_proba(X_new), p)


def test_degenerate_probes():
    X = np.zeros((3, 2, 4), dtype=np.float32)
    one = train_probes(X, ["A", "A", "B"])  # B dropped -> one class
    assert one.classes == ["A"] and (one.rank(X, "A") == 1).all() and (one.rank(X, "B") == UNRANKED).all()
    none = train_probes(X, ["A", "B", "C"])
    assert none.classes == [] and (none.rank(X, "A") == UNRANKED).all()
    keep_all = train_probes(X + np.arange(3, dtype=np.float32)[:, None, None], ["A", "B", "C"], min_examples=1)
    assert keep_all.classes == ["A", "B", "C"]
    with pytest.raises(ValueError):
        train_probes(X, ["A"])


def test_probe_dataset_on_tiny_model(tiny_llama):
    facts = [Fact(id=str(i), prompt=p, answer=a) for i, (p, a) in
             enumerate([("The capital of France is", "Paris"), ("The capital of Japan is", " Tokyo ")])]
    X, y = probe_dataset(tiny_llama, facts, layers=[-1, 0])
    assert X.shape == (2, 2, 64) and X.dtype == np.float32 and y == ["Paris", "Tokyo"]


# ------------------------------------------------------------------------------------------
# the linear-probe attack


def probe_default_layers(n):
    return spread_layers(n, 5, start_frac=1 / 3)


def test_default_layers():
    assert probe_default_layers(30) == [10, 15, 20, 24, 29]
    assert probe_default_layers(18) == [6, 9, 12, 14, 17]
    assert probe_default_layers(4) == [0, 1, 2, 3]
    for n in range(5, 60):
        ls = probe_default_layers(n)
        assert len(ls) == 5 and ls[-1] == n - 1 and ls == sorted(set(ls))


# ------------------------------------------------------------------------------------------
# causal tracing

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def peaky(make_tiny):
    """Tiny models with larger weights, so corrupting the subject visibly moves the output."""
    return {k: make_tiny(k, initializer_range=0.3) for k in ("llama", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_restoring_everything_or_nothing(peaky, kind):
    m = peaky[kind]
    tr = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower")
    T = len(tokenize(m.tokenizer, PROMPT))
    assert tr.probs.shape == (m.n_layers, T) and tr.layers == list(range(m.n_layers)) and len(tr.tokens) == T
    assert abs(math.log(tr.clean_prob / tr.corrupted_prob)) > 0.05  # the corruption does something
    assert ((tr.probs >= 0) & (tr.probs <= 1)).all()
    ids = tokenize(m.tokenizer, PROMPT)
    a = answer_ids(m.tokenizer, PROMPT, "Paris")[0]
    L = list(range(m.n_layers))
    states, clean = _clean_run(m, ids, L, a)
    assert clean == pytest.approx(tr.clean_prob, abs=1e-7)
    sets = ([[]] + [[(layer, p) for layer in L for p in range(T)]]  # nothing; every layer at every position
            + [[(layer, p) for p in range(T)] for layer in L])  # all positions of one layer
    probs = restored_probs(m, ids, a, tr.subject_positions, sets, clean_states=states, state_layers=L,
                           noise_std=tr.noise_std, samples=tr.samples, seed=tr.seed, batch_size=3)
    assert probs[0] == pytest.approx(tr.corrupted_prob, rel=1e-5, abs=1e-8)
    for p in probs[1:]:
        assert float(p) == pytest.approx(clean, rel=1e-5, abs=1e-8)
    # the last layer at the last position is the output itself: restoring it gives the clean prob;
    # the last layer elsewhere never reaches the output
    assert float(tr.probs[-1, -1]) == pytest.approx(clean, rel=1e-5, abs=1e-8)
    assert torch.allclose(tr.probs[-1, :-1], torch.tensor(tr.corrupted_prob), rtol=1e-5, atol=1e-8)
    # positions before the subject are untouched by the noise: restoring them is a no-op
    first = min(tr.subject_positions)
    assert first > 0 and torch.allclose(tr.probs[:, :first], torch.tensor(tr.corrupted_prob), rtol=1e-5)
    # ... which the skipped rows must agree with when actually run
    run = restored_probs(m, ids, a, tr.subject_positions, [[(0, 0)], [(L[-1], first)]], clean_states=states,
                         state_layers=L, noise_std=tr.noise_std, samples=tr.samples, seed=tr.seed)
    assert torch.allclose(run, torch.tensor(tr.corrupted_prob), rtol=1e-5, atol=1e-8)


def test_noise_is_seeded_and_scaled(peaky):
    m = peaky["llama"]
    a = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", seed=3)
    b = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", seed=3, batch_size=7)
    c = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", seed=4)
    assert torch.allclose(a.probs, b.probs, rtol=1e-5, atol=1e-8) and a.corrupted_prob == pytest.approx(b.corrupted_prob)
    assert not torch.allclose(a.probs, c.probs)
    # ROME section 2.1: 10 noise samples, noise = 3 x the std of the subject tokens' embeddings
    assert a.samples == 10
    ids = tokenize(m.tokenizer, PROMPT)
    emb = m.hf.model.embed_tokens.weight.detach()
    subject_std = float(emb[[ids[p] for p in a.subject_positions]].double().std())
    assert a.noise_std == pytest.approx(3.0 * subject_std, rel=1e-6)
    zero = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", noise=0.0)
    assert zero.corrupted_prob == pytest.approx(zero.clean_prob, rel=1e-5)
    two = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", samples=2, seed=3)
    assert two.samples == 2 and two.probs.shape == a.probs.shape
    # the mean over samples: one sample's corrupted probability differs from the 10-sample mean
    one = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", samples=1, seed=3)
    assert one.corrupted_prob != pytest.approx(a.corrupted_prob, rel=1e-4)
    given = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", embedding_std=0.5, noise=2.0)
    assert given.noise_std == pytest.approx(1.0)


FACTS = [Fact(id="eiffel", prompt=PROMPT, answer="Paris", subject="Eiffel Tower", source="facts.jsonl:1"),
         Fact(id="france", prompt="The capital of France is", answer="Paris", subject="France", source="facts.jsonl:2")]


def test_noise_unit_is_the_subject_token_embedding_std(peaky):
    """ROME's collect_embedding_std: the std of the subjects' token embeddings over the facts, not
    of the whole embedding matrix. Scaling the subject tokens' rows by 5 scales it by ~5 while the
    matrix std barely moves."""
    m = copy.copy(peaky["llama"])
    m.hf = copy.deepcopy(m.hf)
    tok = m.tokenizer
    sub_ids = [tokenize(tok, f.prompt)[p] for f in FACTS for p in subject_token_positions(tok, f.prompt, f.subject)]
    emb = m.hf.model.embed_tokens.weight
    with torch.no_grad():
        emb[sorted(set(sub_ids))] *= 5.0
    W = emb.detach().double()
    expect = float(W[sub_ids].std())  # every subject token, repeats included, all d_model values
    std = subject_embedding_std(m, FACTS)
    assert std == pytest.approx(expect, rel=1e-6) and std > 3 * float(W.std())
    # subject strings are tokenised alone (no special tokens), as ROME does
    alone = tok(["Eiffel Tower", "France"], add_special_tokens=False)["input_ids"]
    assert subject_embedding_std(m, ["Eiffel Tower", "France"]) == pytest.approx(
        float(W[[i for row in alone for i in row]].std()), rel=1e-6)
    tr = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", embedding_std=std)
    assert tr.noise_std == pytest.approx(3 * expect, rel=1e-6)
    with pytest.raises(InputError, match="no subject tokens"):
        subject_embedding_std(m, [])


def test_subject_embedding_std_includes_the_embedding_scale(make_tiny):
    """Gemma multiplies its embeddings by sqrt(d_model) = 8 (hidden size 64): the noise is in the
    units the model reads."""
    g = make_tiny("gemma3")
    ids = g.tokenizer("France", add_special_tokens=False)["input_ids"]
    W = g.hf.model.embed_tokens.weight.detach().double()
    assert subject_embedding_std(g, ["France"]) == pytest.approx(8.0 * float(W[ids].std()), rel=1e-5)


def test_a_fact_without_subject_is_refused_for_tracing(peaky, tmp_path):
    m = peaky["llama"]
    bare = Fact(id="bf-capital-cuba", prompt="The capital of Cuba is", answer="Havana", source="facts.jsonl:7")
    for call in (lambda: trace_input(bare), lambda: subject_embedding_std(m, FACTS + [bare]),
                 lambda: trace_fact(m, m, bare, 0.1)):
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value).startswith("facts.jsonl:7 field 'subject': fact 'bf-capital-cuba' has no subject")
        assert (err.value.file, err.value.line, err.value.field) == ("facts.jsonl", 7, "subject")
    moved = Fact(id="x", prompt="The capital of Cuba is", answer="Havana", subject="Havana", source="f.jsonl:3")
    with pytest.raises(InputError, match="^f.jsonl:3 field 'subject': subject 'Havana'"):
        trace_input(moved)
    assert trace_input(FACTS[0]) == (PROMPT, "Eiffel Tower", "subject")


def test_image_facts_are_traced_on_their_text_form_with_the_entity(tmp_path):
    from probe.images import ImagePrompt

    text = "This is the flag of France.\nThe capital of this country is"
    img = Fact(id="img", prompt=ImagePrompt("The capital of this country is", tmp_path / "flag.png"), answer="Paris",
               text_prompt=text, entity="France", source="img.jsonl:4")
    prompt, subject, label = trace_input(img)
    assert (prompt, subject) == (text, "France") and label.startswith("entity 'France' in the text form")
    img.entity = None
    with pytest.raises(InputError, match="^img.jsonl:4 field 'entity': image fact 'img' has no entity"):
        trace_input(img)
    img.entity = "Spain"
    with pytest.raises(InputError, match="^img.jsonl:4 field 'entity': .* names its entity 'Spain' nowhere"):
        trace_input(img)


def test_trace_fact_record(peaky):
    """The run's causal record: the unedited and the edited model as the clean run, the same noise
    (per-fact seed from the run seed) for both, ROME's 10 samples and 3 x the given std."""
    from probe.seeds import fact_seed

    m = peaky["llama"]
    edited_hf = copy.deepcopy(m.hf)
    with torch.no_grad():
        edited_hf.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
    import probe
    edited = probe.wrap_model(edited_hf, m.tokenizer, name="edited")
    std = subject_embedding_std(m, FACTS)
    rec = trace_fact(m, edited, FACTS[0], std, seed=5)
    assert (rec["fact_id"], rec["corrupted"], rec["subject"]) == ("eiffel", "subject", "Eiffel Tower")
    pre, post = CausalTrace.from_json(rec["pre"]), CausalTrace.from_json(rec["post"])
    assert pre.samples == post.samples == 10 and pre.noise_std == post.noise_std == pytest.approx(3 * std)
    assert pre.seed == post.seed == fact_seed(5, CAUSAL_TRACE, "eiffel")
    assert pre.meta["same_model"] and not post.meta["same_model"]
    assert pre.corrupted_prob == pytest.approx(post.corrupted_prob, rel=1e-6)  # same corrupted run of `m`
    assert post.clean_prob != pytest.approx(pre.clean_prob, rel=1e-3)
    direct = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", embedding_std=std, seed=pre.seed)
    assert torch.allclose(direct.probs, pre.probs)
    json.dumps(rec)


def test_explicit_positions_groups_and_clean_model(peaky):
    m = peaky["llama"]
    by_subject = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", layers=[0, -1])
    by_pos = causal_trace(m, PROMPT, "Paris", subject_positions=by_subject.subject_positions, layers=[0, 1])
    assert torch.allclose(by_subject.probs, by_pos.probs) and by_pos.layers == [0, 1]
    T = len(by_pos.tokens)
    grouped = causal_trace(m, PROMPT, "Paris", subject_positions=[-1], groups={"all": range(T), "last": [T - 1]})
    assert grouped.tokens == ["all", "last"] and grouped.probs.shape == (2, 2)
    assert torch.allclose(grouped.probs[:, 0], torch.tensor(grouped.clean_prob), rtol=1e-5)
    with pytest.raises(InputError):
        causal_trace(m, PROMPT, "Paris")
    with pytest.raises(InputError):
        causal_trace(m, PROMPT, "Paris", subject="Louvre")
    with pytest.raises(IndexError):
        causal_trace(m, PROMPT, "Paris", subject_positions=[99])
    # clean states from another ("edited") model: the corrupted run stays on `model`
    edited_hf = copy.deepcopy(m.hf)
    with torch.no_grad():
        edited_hf.model.layers[1].mlp.down_proj.weight.mul_(-1.0)
    import probe
    edited = probe.wrap_model(edited_hf, m.tokenizer, name="edited")
    cross = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", clean_model=edited)
    own = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower")
    assert cross.corrupted_prob == pytest.approx(own.corrupted_prob, rel=1e-6)
    assert cross.clean_prob != pytest.approx(own.clean_prob, rel=1e-3)
    # the edited model's final state at the last position decodes as in the edited model
    assert float(cross.probs[-1, -1]) == pytest.approx(cross.clean_prob, rel=1e-5)
    assert not cross.meta["same_model"]


def test_subject_span_detection(tiny_tokenizer, smollm2_tokenizer):
    cases = [("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
             ("The Eiffel Tower is located in the city of", "Eiffel Tower"),
             ("Where is the Eiffel Tower? It is in", "Eiffel Tower"),
             ("Ça va ? 東京は日本の首都です。 Tokyo", "東京"),
             ("Danielle Darrieux's mother tongue is", "Danielle Darrieux")]
    for tok in (tiny_tokenizer, smollm2_tokenizer):
        for prompt, subject in cases:
            ids = tokenize(tok, prompt)
            pos = subject_token_positions(tok, prompt, subject)
            assert pos == list(range(pos[0], pos[-1] + 1))
            text = tok.decode([ids[i] for i in pos])
            assert subject in text and len(text.strip()) <= len(subject) + 2, (prompt, text)
            start = prompt.index(subject)
            by_decoding = _positions_by_decoding(tok, ids, start, start + len(subject))
            if subject.isascii():
                assert pos == by_decoding
            else:  # byte-level tokens split characters: decoding gives a token sharing a character to both
                assert set(pos) <= set(by_decoding) and len(by_decoding) <= len(pos) + 2
    # SmolLM2: one token per word here
    assert subject_token_positions(smollm2_tokenizer, PROMPT, "The Eiffel Tower") == [0, 1, 2, 3]
    assert subject_token_positions(smollm2_tokenizer, "Paris, not Paris", "Paris", occurrence=1)[0] > 0
    with pytest.raises(InputError):
        subject_token_positions(tiny_tokenizer, PROMPT, "Louvre")


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer


def test_causal_trace_of_a_bos_prompt_equals_the_plain_prompt(peaky, bos_tokenizer):
    """A prompt written with the BOS text is traced exactly as the prompt without it: the same
    ids, the same corrupted (subject) positions, the same map."""
    import probe

    m = probe.wrap_model(peaky["llama"].hf, bos_tokenizer, name="tiny-llama-bos")
    plain = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", samples=2, layers=[0])
    bos = causal_trace(m, "<s>" + PROMPT, "Paris", subject="Eiffel Tower", samples=2, layers=[0])
    assert bos.subject_positions == plain.subject_positions == list(range(3, 12))
    assert bos.tokens == plain.tokens and bos.clean_prob == pytest.approx(plain.clean_prob, rel=1e-6)
    assert torch.allclose(bos.probs, plain.probs, rtol=1e-5, atol=1e-8)


def test_causal_trace_json_roundtrip(peaky):
    tr = causal_trace(peaky["llama"], PROMPT, "Paris", subject="Eiffel Tower")
    back = CausalTrace.from_json(json.loads(json.dumps(tr.to_json())))
    assert torch.equal(back.probs, tr.probs) and back.tokens == tr.tokens
    assert torch.allclose(tr.indirect_effect, tr.probs - tr.corrupted_prob)


@pytest.mark.real
def test_causal_trace_smollm2(smollm2):
    """ROME's setting (10 samples, 3 x the subject-token std over the facts) on three early layers
    (time: 10 samples cost 10 forwards per restoration)."""
    std = subject_embedding_std(smollm2, FACTS)
    tr = causal_trace(smollm2, PROMPT, "Paris", subject="The Eiffel Tower", embedding_std=std, layers=[0, 6, 12])
    assert tr.probs.shape == (3, len(tr.tokens)) and tr.subject_positions == [0, 1, 2, 3] and tr.samples == 10
    assert tr.answer_token == " Paris"
    assert tr.clean_prob > 0.5 > 0.1 > tr.corrupted_prob
    layer, col = tr.peak()
    assert col in tr.subject_positions or col == len(tr.tokens) - 1
    assert float(tr.probs.max()) > 3 * tr.corrupted_prob


# ------------------------------------------------------------------------------------------
# figures


def test_layer_rank_figures():
    from viz.layers import aggregate_layer_rank_figure, layer_rank_figure, median_rank_by_layer

    pre = {"logit lens": [20000, 15000, 30, 1], "tuned lens": [500, 50, 5, 1], "probe": [3, 2, 1, 1]}
    post = {"logit lens": [21000, 18000, 900, 400], "probe": [3, UNRANKED, math.inf, None]}
    fig = layer_rank_figure(pre, post, fact_id="f1")
    assert len(fig.data) == 5 and "f1" in fig.layout.title.text
    assert fig.layout.yaxis.type == "log"
    (probe_post,) = [t for t in fig.data if t.meta == {"kind": "rank", "readout": "probe", "phase": "post"}]
    assert list(probe_post.y) == [3.0, None, None, None] and probe_post.line.dash == "dash"
    (lens_pre,) = [t for t in fig.data if t.meta["readout"] == "logit lens" and t.meta["phase"] == "pre"]
    assert list(lens_pre.y) == [20000, 15000, 30, 1] and list(lens_pre.x) == [0, 1, 2, 3]
    assert len(layer_rank_figure(pre).data) == 3

    rows = [[1, 10, UNRANKED], [3, 20, UNRANKED], [5, 30, 2]]
    assert median_rank_by_layer(rows) == [3, 20, None]
    assert median_rank_by_layer([[1, 4], [3, 8]]) == [2, 6]
    agg = aggregate_layer_rank_figure({"probe": rows, "logit lens": [[9, 8, 7]] * 3}, {"probe": rows[:2]})
    assert len(agg.data) == 3
    (p,) = [t for t in agg.data if t.meta["readout"] == "probe" and t.meta["phase"] == "pre"]
    assert list(p.y) == [3, 20, None] and p.meta["n"] == 3


def test_causal_trace_figure(peaky):
    from viz.layers import causal_trace_figure

    m = peaky["llama"]
    pre = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower")
    post = causal_trace(m, PROMPT, "Paris", subject="Eiffel Tower", seed=5)
    fig = causal_trace_figure(pre, post.to_json())
    assert len(fig.data) == 2 and [t.type for t in fig.data] == ["heatmap", "heatmap"]
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), pre.probs.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.array(fig.data[1].z, dtype=float), post.probs.numpy(), rtol=1e-6)
    assert fig.data[0].zmax == fig.data[1].zmax >= max(float(pre.probs.max()), float(post.probs.max()))
    assert fig.data[0].zmin == 0 and list(fig.data[0].y) == pre.layers
    ticks = fig.layout.xaxis.ticktext
    assert len(ticks) == len(pre.tokens)
    assert [t.endswith("*") for t in ticks] == [i in pre.subject_positions for i in range(len(ticks))]
    assert "corrupted p=" in fig.layout.annotations[0].text and len(fig.layout.annotations) == 2
    assert fig.data[0].meta["clean_prob"] == pre.clean_prob
    assert len(causal_trace_figure(pre).data) == 1
    with pytest.raises(ValueError):
        causal_trace_figure({"probs": [[0.1, 0.2]], "tokens": ["a"], "layers": [0]})


def _naive_restored_probs(m, ids, a, corrupt, sets, states, L, noise_std, samples, seed) -> torch.Tensor:
    """Reference for :func:`restored_probs`: one full plain-PyTorch forward of every (set, sample)
    row, noise added by a hook on the embedding, states overwritten by hooks on the layers."""
    from probe.arch import get_attr_path

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, len(corrupt), states.shape[-1], generator=gen) * noise_std
    rows = [(r, s) for r in range(len(sets)) for s in range(samples)]
    B = len(rows)
    hooks = []

    def add_noise(module, args, out):
        out = out.clone()
        out[:, corrupt] += noise[[s for _, s in rows]]
        return out

    def restore(layer):
        def hook(module, args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            for b, (r, _) in enumerate(rows):
                for lay, p in sets[r]:
                    if lay == layer:
                        h[b, p] = states[L.index(layer), p]
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        return hook

    hooks.append(get_attr_path(m.hf, m.arch.embed).register_forward_hook(add_noise))
    for layer in L:
        hooks.append(get_attr_path(m.hf, m.arch.layers)[layer].register_forward_hook(restore(layer)))
    try:
        with torch.no_grad():
            logits = m.hf(input_ids=torch.tensor([ids] * B), use_cache=False).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    p = torch.softmax(logits.double(), -1)[:, a].view(len(sets), samples)
    return p.mean(1).float()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3", "gptj", "neox", "gemma3-window", "llama-no-cache"])
@pytest.mark.parametrize("bands", [1, 2, 6])
def test_restored_probs_match_full_forwards(make_tiny, monkeypatch, kind, bands):
    """The batched restorations -- positions before a set's first position taken from the corrupted
    run's key/value cache, layers before its band skipped -- give the probabilities of one plain
    full forward per row, for single states, several states of one set, and sets spanning bands.
    A sliding window shorter than the prompt (its cache cannot be cut back) and a model whose
    forward takes no cache run every row over all positions, with the same results."""
    import probe.causal as causal

    arch = kind.split("-")[0]
    over = {"n_layer": 5} if arch in ("gpt2", "gptj") else {"num_hidden_layers": 5}
    if kind == "gemma3-window":
        over.update(sliding_window=4, layer_types=["sliding_attention"] * 4 + ["full_attention"])
    m = make_tiny(arch, initializer_range=0.3, **over)
    if kind == "llama-no-cache":
        monkeypatch.setattr(causal, "_cache_kwarg", lambda model: None)
    assert m.n_layers == 5
    monkeypatch.setattr(causal, "LAYER_BANDS", bands)
    groups = []  # (first position, band start) of every batched trace
    run_group = causal._run_group
    monkeypatch.setattr(causal, "_run_group", lambda *a, **k: groups.append(a[5:7]) or run_group(*a, **k))
    ids = tokenize(m.tokenizer, PROMPT)
    T = len(ids)
    a = answer_ids(m.tokenizer, PROMPT, "Paris")[0]
    corrupt = subject_token_positions(m.tokenizer, PROMPT, "Eiffel Tower")
    L = list(range(5))
    states, _ = _clean_run(m, ids, L, a)
    sets = [[], [(0, 0)], [(2, corrupt[0])], [(4, T - 1)], [(1, T - 2), (3, corrupt[-1])], [(3, 1), (4, 2)],
            [(layer, T - 3) for layer in L], [(0, p) for p in range(T)]]
    got = restored_probs(m, ids, a, corrupt, sets, clean_states=states, state_layers=L, noise_std=0.7, samples=2,
                         seed=5, batch_size=3)
    want = _naive_restored_probs(m, ids, a, corrupt, sets, states, L, 0.7, 2, 5)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
    assert len(set(got.tolist())) >= 5  # the sets give different probabilities: the check has teeth
    # the short cuts were taken: later positions ran on the cache (unless it cannot be cut back),
    # later bands skipped layers
    assert max(start for start, _ in groups) == (0 if kind in ("gemma3-window", "llama-no-cache") else T - 1)
    assert sorted({band for _, band in groups}) == {1: [0], 2: [0, 3], 6: [0, 1, 2, 3, 4]}[bands]
