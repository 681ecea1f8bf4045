"""Unit tests of probe-attack's public API on tiny random models (no network)."""

from __future__ import annotations

import pytest
import torch

import probe
import attacks as wb
from probe.model import clone_model
from probe.tokens import tokenize

P1 = "The capital of France is"
P2 = "Water is made of hydrogen and"


# ---------------------------------------------------------------------------------------------
# load_model


def test_load_model_nonexistent_path():
    with pytest.raises(probe.ModelLoadError, match="does not exist"):
        probe.load_model("/nonexistent/model")


def test_load_model_missing_gguf(tmp_path):
    with pytest.raises(probe.ModelLoadError, match="not found"):
        probe.load_model(str(tmp_path / "missing.gguf"))


def test_load_model_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(probe.ModelLoadError, match="config.json"):
        probe.load_model(str(tmp_path))


def test_load_model_id_not_in_cache():
    with pytest.raises(probe.ModelLoadError, match="local cache"):
        probe.load_model("no-such-org/no-such-model-xyz")


def test_load_model_bad_dtype():
    with pytest.raises(probe.ModelLoadError, match="dtype"):
        probe.load_model("/nonexistent/model", dtype="int3")


def test_load_model_from_local_dir(tiny_llama, tmp_path):
    tiny_llama.hf.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    m = probe.load_model(str(tmp_path))
    assert isinstance(m, probe.ProbeModel) and m.n_layers == 2
    a = probe.residual_stream(m, [P1, P2])
    b = probe.residual_stream(tiny_llama, [P1, P2])
    assert torch.allclose(a, b, atol=1e-6)
    assert m.fingerprint and m.fingerprint == probe.load_model(str(tmp_path)).fingerprint


def test_load_model_accepts_pretrained_model(tiny_llama):
    m = probe.load_model(tiny_llama.hf, tokenizer=tiny_llama.tokenizer)
    assert m.hf is tiny_llama.hf and m.tokenizer is tiny_llama.tokenizer
    assert torch.equal(probe.residual_stream(m, P1), probe.residual_stream(tiny_llama, P1))
    assert probe.load_model(m) is m  # a ProbeModel is returned as is


def test_load_model_requires_tokenizer_for_module(tiny_llama):
    with pytest.raises(probe.ModelLoadError, match="tokenizer"):
        probe.load_model(tiny_llama.hf)


def test_load_model_accepts_nnsight_envoy(tiny_llama):
    import nnsight

    envoy = nnsight.NNsight(tiny_llama.hf)
    m = probe.load_model(envoy, tokenizer=tiny_llama.tokenizer)
    assert m.nn is envoy and m.hf is tiny_llama.hf
    assert torch.allclose(probe.residual_stream(m, [P1, P2]), probe.residual_stream(tiny_llama, [P1, P2]),
                          atol=1e-6)


def test_load_model_rejects_other_objects():
    with pytest.raises(probe.ModelLoadError):
        probe.load_model(12345)


def test_unsupported_architecture(tiny_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    hf = tf.BertLMHeadModel(cfg).eval()
    with pytest.raises(probe.UnsupportedArchitectureError) as ei:
        probe.wrap_model(hf, tiny_tokenizer)
    assert "bert" in str(ei.value) and "llama" in str(ei.value) and "register" in str(ei.value)


def test_register_architecture_conflict():
    arch = probe.Architecture("x", ("llama",), "a", "b", "c", "d")
    with pytest.raises(ValueError, match="already registered"):
        probe.register_architecture(arch)
    assert "llama" in probe.supported_model_types()


def test_model_properties(make_tiny):
    m = make_tiny("gpt2")
    assert (m.n_layers, m.d_model, m.vocab_size) == (2, 64, len(m.tokenizer))
    assert m.context_length == 64 and m.dtype == torch.float32 and m.device.type == "cpu"
    assert m.softcap is None
    assert "tiny-gpt2" in repr(m)


# ---------------------------------------------------------------------------------------------
# residual_stream


def test_residual_stream_positions(tiny_llama):
    m = tiny_llama
    n1, n2 = len(tokenize(m.tokenizer, P1)), len(tokenize(m.tokenizer, P2))
    r = probe.residual_stream(m, [P1, P2], positions=[0, 1, -1])
    assert r.shape == (2, 2, 3, 64) and r.dtype == torch.float32
    # per-prompt single runs, all positions
    for i, (p, n) in enumerate([(P1, n1), (P2, n2)]):
        full = probe.residual_stream(m, p, positions=list(range(n)))[0]  # [L, n, d]
        assert torch.allclose(r[i, :, 0], full[:, 0], atol=1e-5)
        assert torch.allclose(r[i, :, 1], full[:, 1], atol=1e-5)
        assert torch.allclose(r[i, :, 2], full[:, n - 1], atol=1e-5)
        # negative and positive indices agree
        neg = probe.residual_stream(m, p, positions=[-n, -1])[0]
        assert torch.allclose(neg[:, 0], full[:, 0], atol=1e-6) and torch.allclose(neg[:, 1], full[:, -1], atol=1e-6)
    # an int position drops the position axis; -1 is the default
    assert torch.equal(probe.residual_stream(m, [P1, P2], positions=-1), probe.residual_stream(m, [P1, P2]))
    assert torch.allclose(probe.residual_stream(m, [P1, P2], positions=1), r[:, :, 1], atol=1e-6)


def test_residual_stream_position_out_of_range(tiny_llama):
    n = len(tokenize(tiny_llama.tokenizer, P1))
    with pytest.raises(IndexError):
        probe.residual_stream(tiny_llama, P1, positions=[n])
    with pytest.raises(IndexError):
        probe.residual_stream(tiny_llama, P1, positions=-(n + 1))
    # valid for the longer prompt but not the shorter one
    n2 = len(tokenize(tiny_llama.tokenizer, P2))
    with pytest.raises(IndexError):
        probe.residual_stream(tiny_llama, [P1, P2], positions=[max(n, n2) - 1])


def test_residual_stream_layers(tiny_llama):
    m = tiny_llama
    full = probe.residual_stream(m, [P1, P2])
    assert full.shape == (2, 2, 64)
    assert torch.allclose(probe.residual_stream(m, [P1, P2], layers=[1])[:, 0], full[:, 1], atol=1e-6)
    assert torch.allclose(probe.residual_stream(m, [P1, P2], layers=-1)[:, 0], full[:, 1], atol=1e-6)
    assert torch.allclose(probe.residual_stream(m, [P1, P2], layers=[-2])[:, 0], full[:, 0], atol=1e-6)
    assert torch.allclose(probe.residual_stream(m, [P1, P2], layers=[1, 0, -1]), full, atol=1e-6)  # sorted, dedup
    assert not torch.allclose(full[:, 0], full[:, 1], atol=1e-3)
    for bad in (2, -3, [0, 5]):
        with pytest.raises(IndexError):
            probe.residual_stream(m, P1, layers=bad)


def test_residual_stream_single_string(tiny_llama):
    assert probe.residual_stream(tiny_llama, P1).shape == (1, 2, 64)


# ---------------------------------------------------------------------------------------------
# logit lens


def test_logit_lens_shape_and_normalisation(tiny_llama):
    r = probe.residual_stream(tiny_llama, [P1, P2], positions=[0, -1])
    lp = probe.logit_lens(tiny_llama, r)
    assert lp.shape == (2, 2, 2, tiny_llama.vocab_size) and lp.dtype == torch.float32
    assert torch.logsumexp(lp, -1).abs().max().item() < 1e-5
    assert (lp <= 0).all()
    logits = probe.lens_logits(tiny_llama, r)
    assert torch.allclose(lp, torch.log_softmax(logits, -1), atol=1e-6)
    # the LogitLens module is cached and equals the functional form
    lens = probe.LogitLens.from_model(tiny_llama)
    assert lens is probe.LogitLens.from_model(tiny_llama)
    assert torch.equal(lens(r), logits)


def test_logit_lens_follows_replaced_unembedding(make_tiny):
    m = make_tiny("llama")
    r = probe.residual_stream(m, P1)
    before = probe.lens_logits(m, r)
    m.hf.lm_head.weight = torch.nn.Parameter(m.hf.lm_head.weight.detach() * 2)
    after = probe.lens_logits(m, r)
    assert torch.allclose(after, 2 * before, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attacks.lens


def test_default_layers_and_budgets_30_layers():
    hp, pd, pd2 = wb.HeadProjection(), wb.ProbabilityDelta(), wb.PD2()
    assert hp.resolve_layers(30) == [22, 24, 26, 27, 29]
    assert pd.resolve_layers(30) == list(range(24, 30))
    assert pd2.resolve_layers(30) == list(range(23, 30))
    assert hp.budget(30) == hp.k * 5 == 20
    assert pd.budget(30) == 2 * pd.k * (6 - 1) == 20
    assert pd2.budget(30) == 2 * pd2.k * (7 - 2) == 20
    assert wb.PD2(sides="top").budget(30) == pd2.k * 5


@pytest.mark.parametrize("n", [2, 5, 8, 12, 30, 32])
def test_default_layers_properties(n):
    for attack, count in ((wb.HeadProjection(), 5), (wb.ProbabilityDelta(), 6), (wb.PD2(), 7)):
        layers = attack.resolve_layers(n)
        assert layers == sorted(set(layers)) and layers[-1] == n - 1
        assert len(layers) == min(n, count) and all(0 <= x < n for x in layers)
    k = 3
    L = lambda a: len(a.resolve_layers(n))  # noqa: E731
    assert wb.HeadProjection(k=k).budget(n) == k * L(wb.HeadProjection())
    assert wb.ProbabilityDelta(k=k).budget(n) == 2 * k * max(0, L(wb.ProbabilityDelta()) - 1)
    assert wb.PD2(k=k).budget(n) == 2 * k * max(0, L(wb.PD2()) - 2)


def test_explicit_layers_and_budget():
    hp = wb.HeadProjection(k=4, layers=[-1, 0, 3, 3])
    assert hp.resolve_layers(10) == [0, 3, 9] and hp.budget(10) == 12
    assert hp.budget(10, k=2) == 6
    assert wb.ProbabilityDelta(k=2, layers=[1, 2, 3]).budget(10) == 8
    assert wb.PD2(k=2, layers=[1, 2, 3]).budget(10) == 4
    with pytest.raises(ValueError, match="out of range"):
        wb.HeadProjection(layers=[10]).resolve_layers(10)


def _ranked_logits(V, answer, rank, seed=0):
    """A logit vector where ``answer`` has 1-based rank ``rank`` (distinct values)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.randperm(V, generator=g).float()  # distinct 0..V-1
    order = vals.argsort(descending=True)
    x = vals.clone()
    target = order[rank - 1]
    x[target], x[answer] = vals[answer], vals[target]
    return x


from probe.readout import LensBatch  # noqa: E402


def test_head_projection_best_rank():
    V, answer = 50, 7
    logits = torch.stack([_ranked_logits(V, answer, r, seed=i) for i, r in enumerate([30, 3, 12])])[None]
    from probe.readout import answer_rank

    assert answer_rank(logits, torch.tensor([[answer] * 3])).tolist() == [[30, 3, 12]]
    hp = wb.HeadProjection(k=4, layers=[0, 1, 2])
    assert hp.best_rank(LensBatch(logits, torch.tensor([answer])), 3).tolist() == [3]
    assert wb.HeadProjection(k=4, layers=[0, 2]).best_rank(LensBatch(logits, torch.tensor([answer])), 3).tolist() == [12]
    assert wb.success_at([3, 12, 1], 4) == pytest.approx(2 / 3)
    assert wb.success_at([3, 12, 1], 2) == pytest.approx(1 / 3)


def _jump_logits(V=100, answer=7, big=19):
    """Three layers: ``big`` tokens dominate every layer; the answer's probability jumps from ~0
    (layer 0) to ~3.5e-4 (layer 1) and stays (layer 2). Its lens rank is never better than big+1."""
    base = torch.zeros(V)
    base[torch.arange(big) + 50] = 10.0
    l0, l1 = base.clone(), base.clone()
    l0[answer] = -10.0
    l1[answer] = 5.0
    return torch.stack([l0, l1, l1.clone()])[None]


def test_probability_delta_detects_jump():
    answer = 7
    logits = _jump_logits(answer=answer)
    a = torch.tensor([answer])
    hp = wb.HeadProjection(k=4, layers=[0, 1, 2]).best_rank(LensBatch(logits, a), 3).item()
    assert hp == 20
    assert wb.ProbabilityDelta(k=2, layers=[0, 1]).best_rank(LensBatch(logits, a), 3).item() == 1
    assert wb.ProbabilityDelta(k=2, layers=[0, 1, 2]).best_rank(LensBatch(logits, a), 3).item() == 1
    # a probability drop is found by the bottom-k side only
    rev = logits.flip(1)
    assert wb.ProbabilityDelta(k=2, layers=[0, 1, 2]).best_rank(LensBatch(rev, a), 3).item() == 1
    assert wb.ProbabilityDelta(k=2, layers=[1, 2], sides="top").best_rank(LensBatch(rev, a), 3).item() > 2
    # PD²: the second difference at the middle layer (jump then flat) is extreme for the answer
    assert wb.PD2(k=2, layers=[0, 1, 2]).best_rank(LensBatch(logits, a), 3).item() == 1
    # too few layers: never a success
    assert wb.PD2(layers=[0, 1]).best_rank(LensBatch(logits, a), 3).item() > 10 ** 9
    assert wb.ProbabilityDelta(layers=[1]).best_rank(LensBatch(logits, a), 3).item() > 10 ** 9


def test_lens_attacks_scored_from_one_sweep(tiny_llama):
    from attacks import AttackContext, evaluate_attacks, summarize

    # k = 24: " cap" is the random model's 20th token after P1 at layer 1 (its best token that
    # round-trips as an answer), " oxygen" ranks 295th at best -- one success, one failure
    attacks = [wb.HeadProjection(k=24, layers=[0, 1]), wb.ProbabilityDelta(k=2, layers=[0, 1])]
    prompts, answers = [P1, P2], ["cap", "oxygen"]
    facts = [probe.facts.Fact(f"f{i}", p, a) for i, (p, a) in enumerate(zip(prompts, answers))]
    reads, outs = evaluate_attacks(tiny_llama, facts, attacks, AttackContext())
    resid = probe.residual_stream(tiny_llama, prompts)
    lens = probe.lens_logits(tiny_llama, resid)
    for i, r in enumerate(reads["logit"]):
        assert r.attack_ranks == {}  # moved into the outcomes
        # references from the definitions (Patil et al. 2024, section 3), on the lens logits
        # [n_layers, vocab] at the last position: HP = the answer's best rank over the layers' lens
        # distributions; PD = its best rank from the top or the bottom of p(layer 1) - p(layer 0)
        first = probe.answer_ids(tiny_llama.tokenizer, prompts[i], answers[i])[0]
        z = lens[i].double()
        hp_rank = min(int((z[layer] > z[layer, first]).sum()) + 1 for layer in (0, 1))
        d = torch.softmax(z[1], -1) - torch.softmax(z[0], -1)
        pd_rank = min(int((d > d[first]).sum()), int((d < d[first]).sum())) + 1
        assert outs["head-projection"][i].best_rank == hp_rank == min(r.rank)
        assert outs["probability-delta"][i].best_rank == pd_rank
    # measured: HP ranks 20 and 295 (k 24), PD ranks 2 and 121 (k 2): both attacks find " cap" only
    assert [o.best_rank for o in outs["head-projection"]] == [20, 295]
    assert [o.best_rank for o in outs["probability-delta"]] == [2, 121]
    assert [o.success for o in outs["head-projection"]] == [o.success for o in outs["probability-delta"]] == [True, False]
    hp = summarize(attacks[0], 2, outs["head-projection"])
    assert hp.budget == 48 and summarize(attacks[1], 2, outs["probability-delta"]).budget == 4
    assert hp.success_pre == 0.5 and hp.success_post is None
    # success within k over the curve's k: " cap" counts from k = 20 on
    assert dict(zip(hp.curve_k, hp.curve_pre)) == {k: 0.5 if k >= 20 else 0.0 for k in hp.curve_k}


def test_make_attack():
    a = wb.make_attack("head-projection", k=3, layers=None)
    assert isinstance(a, wb.HeadProjection) and a.k == 3 and a.layers is None
    assert isinstance(wb.make_attack("pd2"), wb.PD2)
    with pytest.raises(ValueError) as ei:
        wb.make_attack("nope")
    for name in ("head-projection", "probability-delta", "pd2"):
        assert name in str(ei.value)


# ---------------------------------------------------------------------------------------------
# clone_model


@pytest.mark.parametrize("kind,over", [("llama", {}), ("llama", {"tie_word_embeddings": True})])
def test_clone_model_shares_all_but_copied(make_tiny, kind, over):
    m = make_tiny(kind, **over)
    name = "model.layers.0.mlp.down_proj.weight"
    c = clone_model(m, [name])
    orig = dict(m.hf.named_parameters())
    twin = dict(c.hf.named_parameters())
    assert set(orig) == set(twin)
    for k, p in twin.items():
        if k == name:
            assert p.data_ptr() != orig[k].data_ptr() and torch.equal(p, orig[k])
        else:
            assert p.data_ptr() == orig[k].data_ptr(), k
    if over.get("tie_word_embeddings"):
        assert c.hf.lm_head.weight.data_ptr() == c.hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        twin[name].add_(1.0)
    assert not torch.equal(twin[name], orig[name])
    # the clone's edit changes its outputs, not the original's
    assert not torch.allclose(probe.residual_stream(c, P1), probe.residual_stream(m, P1), atol=1e-3)
    with pytest.raises(KeyError):
        clone_model(m, ["model.no.such.weight"])


# ---------------------------------------------------------------------------------------------
# tokens


def test_encode_batch(tiny_llama):
    b = probe.encode(tiny_llama, [P1, P2])
    n1, n2 = len(tokenize(tiny_llama.tokenizer, P1)), len(tokenize(tiny_llama.tokenizer, P2))
    T = max(n1, n2)
    assert b.input_ids.shape == b.attention_mask.shape == b.position_ids.shape == (2, T)
    assert b.lengths.tolist() == [n1, n2]
    assert b.attention_mask.sum(1).tolist() == [n1, n2]
    short = 0 if n1 < n2 else 1
    assert b.attention_mask[short, : T - min(n1, n2)].sum() == 0  # padded on the left
    assert b.positions([0, -1]).tolist()[short] == [T - min(n1, n2), T - 1]
    with pytest.raises(ValueError):
        probe.encode(tiny_llama, [P1], padding_side="middle")
    assert probe.encode(tiny_llama, P1).input_ids.shape[0] == 1


def test_cache_dir_precedence(monkeypatch, tmp_path):
    """$PROBE_ATTACK_CACHE overrides $XDG_CACHE_HOME/probe-attack, which overrides ~/.cache/probe-attack."""
    from probe.model import cache_dir

    monkeypatch.delenv("PROBE_ATTACK_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "probe-attack"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "probe-attack"
    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_gguf_path_that_does_not_exist():
    with pytest.raises(probe.ModelLoadError, match="GGUF file not found"):
        probe.load_model("/nonexistent/model.gguf")


def test_a_prompt_starting_with_the_bos_text_gets_one_bos(bos_tokenizer):
    """Gemma-3 read "<bos>The chemical symbol for gold is" with two BOS tokens (p(" Au") 0.27 ->
    0.16, top-1 " Au" -> " gold"): a prompt that already starts with the BOS text is tokenised to
    the same ids as the prompt without it."""
    tok = bos_tokenizer
    bos = tok.convert_tokens_to_ids("<s>")
    plain = tokenize(tok, "The capital of France is")
    assert plain[0] == bos and plain[1] != bos  # the tokenizer adds a BOS
    assert tokenize(tok, "<s>The capital of France is") == plain
    assert tok("<s>The capital of France is")["input_ids"][:2] == [bos, bos]  # what it did before


class _NoOffsets:
    """A tokenizer without offset mappings (as a slow tokenizer): forces the decoding fallbacks."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets")
        return self._tok(text, **kw)


def test_subject_positions_of_a_bos_prompt_index_its_one_bos_ids(bos_tokenizer):
    """Issue 11 item 8: the subject's token positions (causal tracing's corrupted tokens, ROME's
    subject-last token) index the ids the model reads, so "<s>The Eiffel Tower ..." has the same
    positions as "The Eiffel Tower ..." (they were one token late: offsets of the doubled ids)."""
    from defenses.rome import last_token_index, subject_span
    from probe.causal import subject_token_positions
    from probe.tokens import tokenize_with_offsets

    prompt = "The Eiffel Tower is located in the city of"
    for tok in (bos_tokenizer, _NoOffsets(bos_tokenizer)):
        ids, spans = tokenize_with_offsets(tok, "<s>" + prompt)
        assert ids == tokenize(tok, prompt)
        pos = subject_token_positions(tok, "<s>" + prompt, "Eiffel Tower")
        assert pos == subject_token_positions(tok, prompt, "Eiffel Tower") == list(range(3, 12))
        assert tok.decode([ids[i] for i in pos]) == "Eiffel Tower"
        last = last_token_index(tok, "<s>" + prompt, subject_span("<s>" + prompt, "Eiffel Tower"))
        assert last == last_token_index(tok, prompt, subject_span(prompt, "Eiffel Tower")) == 11
    ids, spans = tokenize_with_offsets(bos_tokenizer, "<s>" + prompt)
    plain_ids, plain_spans = tokenize_with_offsets(bos_tokenizer, prompt)
    assert spans[0] == (0, 3) and plain_spans[0] == (0, 0)  # the BOS written in the text; the one added
    assert [(s - 3, e - 3) for s, e in spans[1:]] == plain_spans[1:]
    assert tokenize_with_offsets(_NoOffsets(bos_tokenizer), prompt) == (plain_ids, None)


@pytest.mark.real
def test_gemma_bos_prompt_is_read_once(gemma):
    tok = gemma.tokenizer
    assert tokenize(tok, "<bos>The chemical symbol for gold is") == tokenize(tok, "The chemical symbol for gold is")


@pytest.mark.real
def test_gemma_subject_positions_of_a_bos_prompt(gemma):
    from defenses.rome import last_token_index, subject_span
    from probe.causal import subject_token_positions

    tok = gemma.tokenizer
    for prompt in ("<bos>The chemical symbol for gold is", "The chemical symbol for gold is"):
        ids = tokenize(tok, prompt)
        assert subject_token_positions(tok, prompt, "gold") == [5] and tok.decode([ids[5]]) == " gold"
        assert last_token_index(tok, prompt, subject_span(prompt, "gold")) == 5
