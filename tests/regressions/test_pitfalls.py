"""Regression tests for the known failure modes in ../shared/docs/pitfalls.md.

One test (or a few) per pitfall row; each docstring cites the public report it guards against.
Everything runs on tiny random models (no network); the SmolLM2 tokenizer checks are marked
``real``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import probe
import probe.facts
from probe.arch import resolve_architecture
from probe.tokens import encode_ids, tokenize

P1 = "The capital of France is"
P2 = "Water is made of hydrogen and"
P3 = "Paris is the capital of"
PROMPTS = [P1, P2, P3]


# ---------------------------------------------------------------------------------------------
# helpers


def own_logits(model, prompts, padding_side="left"):
    """The model's own logits ``[B, T, V]`` for a padded batch (plain HF forward, fp32)."""
    batch = probe.encode(model, prompts, padding_side=padding_side)
    with torch.no_grad():
        out = model.hf(**batch.model_inputs())
    return out.logits.float(), batch


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


def n_tokens(model, prompt):
    return len(tokenize(model.tokenizer, prompt))


def assert_lens_final(model, prompts=(P1, P2), atol=1e-4):
    """LENS-FINAL: the lens on the last decoder layer's output reproduces the model's logits, at
    every position of a single prompt and at the last position of a padded batch."""
    n = n_tokens(model, prompts[0])
    resid = probe.residual_stream(model, prompts[0], layers=[-1], positions=list(range(n)))  # [1, 1, n, d]
    assert resid.shape == (1, 1, n, model.d_model)
    lens = probe.lens_logits(model, resid[:, 0])  # [1, n, V]
    logits, _ = own_logits(model, [prompts[0]])
    assert lens.shape == logits.shape
    assert (lens - logits).abs().max().item() < atol

    resid_b = probe.residual_stream(model, list(prompts), layers=[-1])  # [B, 1, d]
    logits_b, batch = own_logits(model, list(prompts))
    rows = torch.arange(len(prompts))
    want = logits_b[rows, batch.last_index()]
    got = probe.lens_logits(model, resid_b[:, 0])
    assert (got - want).abs().max().item() < atol


# ---------------------------------------------------------------------------------------------
# LENS-FINAL on every registered family


@pytest.mark.parametrize("kind,over", [
    ("llama", {}), ("gpt2", {}), ("gemma3", {}), ("gemma3", {"final_logit_softcapping": 30.0}),
    ("gptj", {}), ("neox", {}),
])
def test_lens_final_reproduces_logits(make_tiny, kind, over):
    """LENS-FINAL oracle (pitfalls.md): the lens at the last layer equals the model's own logits,
    including Gemma's final soft-cap (transformers PR #40994 for the pre/post-norm convention)."""
    model = make_tiny(kind, **over)
    if over.get("final_logit_softcapping"):
        assert model.softcap == 30.0
        # the cap is actually active: a lens without it would differ
        n = n_tokens(model, P1)
        resid = probe.residual_stream(model, P1, layers=[-1], positions=list(range(n)))[:, 0]
        x = model.final_norm(resid)
        uncapped = nn.functional.linear(x, model.unembed.weight, model.unembed.bias)
        capped = probe.lens_logits(model, resid)
        assert torch.allclose(capped, torch.tanh(uncapped / 30.0) * 30.0, atol=1e-5)
    assert_lens_final(model)


def test_lens_final_llava_language_model(tiny_llava):
    """LENS-FINAL for the language model inside a VLM (pitfall 2: the VLM's final norm is
    ``model.language_model.norm``; text-only input)."""
    assert tiny_llava.final_norm is tiny_llava.hf.model.language_model.norm
    assert_lens_final(tiny_llava)


# ---------------------------------------------------------------------------------------------
# 1. per-layer norm statistics


def test_1_lens_recomputes_norm_statistics(tiny_llama):
    """TransformerLens #1076 (fixed in PRs #1077/#1180): the final norm must be applied freshly to
    each layer's residual. An RMSNorm lens is scale invariant: lens(10 h_0) == lens(h_0)."""
    h0 = probe.residual_stream(tiny_llama, [P1, P2], layers=[0], positions=-1)[:, 0]
    a = probe.lens_logits(tiny_llama, h0)
    b = probe.lens_logits(tiny_llama, 10 * h0)
    assert (a - b).abs().max().item() < 1e-3
    # a lens that reused a cached (fixed) scale would scale the logits ~10x: the check can fail
    assert (10 * a - a).abs().max().item() > 1e-1
    assert_lens_final(tiny_llama)


# ---------------------------------------------------------------------------------------------
# 2. final norm resolution, never a silent identity


class HidingWrapper(nn.Module):
    """A custom wrapper that hides the usual attribute names (``model``, ``lm_head``)."""

    def __init__(self, inner, expose_config: bool):
        super().__init__()
        self.inner = inner
        if expose_config:
            self.config = inner.config

    def forward(self, *a, **k):
        return self.inner(*a, **k)


def test_2_final_norm_is_the_models_rmsnorm(tiny_llama):
    """tuned-lens #56: the final norm of a Llama is its RMSNorm, not an identity fallback."""
    arch = resolve_architecture(tiny_llama.hf)
    assert arch.final_norm == "model.norm"
    assert tiny_llama.final_norm is tiny_llama.hf.model.norm
    assert "RMSNorm" in type(tiny_llama.final_norm).__name__
    assert_lens_final(tiny_llama)


def test_2_identity_norm_lens_fails_lens_final(tiny_llama):
    """tuned-lens #56: an identity-norm lens fails LENS-FINAL, so the oracle would catch it."""
    resid = probe.residual_stream(tiny_llama, P1, layers=[-1])[:, 0]
    logits, batch = own_logits(tiny_llama, [P1])
    want = logits[0, batch.last_index()[0]]
    no_norm = nn.functional.linear(resid, tiny_llama.unembed.weight)[0]
    assert (no_norm - want).abs().max().item() > 1e-2
    assert (probe.lens_logits(tiny_llama, resid)[0] - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("expose_config", [False, True])
def test_2_hidden_names_raise(tiny_llama, expose_config):
    """tuned-lens #56: a wrapper that hides the module names gets an explicit error (listing what is
    supported and how to register an adapter), never a silent identity norm."""
    wrapper = HidingWrapper(tiny_llama.hf, expose_config)
    with pytest.raises(probe.UnsupportedArchitectureError) as ei:
        resolve_architecture(wrapper)
    msg = str(ei.value)
    assert "register" in msg.lower()
    assert "register_architecture" in msg
    if expose_config:
        assert "model.layers" in msg  # names the missing path
    else:
        assert "llama" in msg and "gpt2" in msg  # lists the supported types
    with pytest.raises(probe.UnsupportedArchitectureError):
        probe.wrap_model(wrapper, tiny_llama.tokenizer)


def test_2_hidden_names_error_lists_supported_types(tiny_llama):
    """tuned-lens #56: every unsupported-architecture error lists the supported types and how to register."""
    with pytest.raises(probe.UnsupportedArchitectureError) as ei:
        resolve_architecture(HidingWrapper(tiny_llama.hf, expose_config=True))
    assert "gpt2" in str(ei.value) and "gpt_neox" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# 3. hidden_states[-1] is post-norm


def test_3_last_hidden_state_is_not_normalised_twice(make_tiny):
    """transformers PR #40994 (issue #40964); DoLa #9: HF ``hidden_states[-1]`` is already post-norm.
    Our residuals come from decoder-layer outputs, so the lens equals the logits; normalising
    ``hidden_states[-1]`` again visibly breaks LENS-FINAL."""
    model = make_tiny("llama")
    with torch.no_grad():
        w = model.hf.model.norm.weight
        w.copy_(torch.tensor([0.5, 2.0]).repeat(w.numel() // 2))
    ids = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        out = model.hf(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == model.n_layers + 1 == 3
    logits = out.logits[0]

    resid = probe.residual_stream(model, model.tokenizer.decode([1, 5, 9]), layers=None, positions=[0, 1, 2])
    assert tokenize(model.tokenizer, model.tokenizer.decode([1, 5, 9])) == [1, 5, 9]
    ours = probe.lens_logits(model, resid[0, -1])  # [3, V]
    assert (ours - logits).abs().max().item() < 1e-4
    # layer 0 output == hidden_states[1] (pre-norm); the last layer output is NOT hidden_states[-1]
    assert torch.allclose(resid[0, 0], hs[1][0], atol=1e-6)
    assert (resid[0, -1] - hs[-1][0]).abs().max().item() > 1e-2
    twice = model.hf.lm_head(model.hf.model.norm(hs[-1][0]))
    assert (twice - logits).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------
# 4. tied embeddings


@pytest.mark.parametrize("kind,over", [("gpt2", {}), ("llama", {"tie_word_embeddings": True})])
def test_4_tied_models_share_storage(make_tiny, kind, over):
    """transformers PR #43429 / issue #11903: a tied model's lens uses exactly the input embedding."""
    model = make_tiny(kind, **over)
    embed = model.hf.get_input_embeddings().weight
    assert model.unembed.weight.data_ptr() == embed.data_ptr()
    assert_lens_final(model)


def test_4_untied_model_is_not_shared(tiny_llama):
    """Control for the tied check: an untied Llama has two separate tensors and still passes LENS-FINAL."""
    assert tiny_llama.unembed.weight.data_ptr() != tiny_llama.hf.get_input_embeddings().weight.data_ptr()
    assert_lens_final(tiny_llama)


def test_4_tied_config_with_separate_head_is_refused(tiny_tokenizer):
    """transformers PR #43429: a tied config whose lm_head is a separate (possibly random) tensor
    must be refused, not decoded."""
    import conftest

    hf = conftest._tiny("llama", len(tiny_tokenizer), tie_word_embeddings=True).eval()
    hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
    with pytest.raises(probe.UnsupportedArchitectureError, match="tie"):
        probe.wrap_model(hf, tiny_tokenizer)


def test_4_llava_text_config_tie(tiny_tokenizer):
    """transformers PR #43429: the tie flag may live only in ``text_config`` of a VLM. A tiny LLaVA
    with ``text_config.tie_word_embeddings=True`` must decode with the shared embedding."""
    import conftest

    hf = conftest.build_tiny_llava(tiny_tokenizer, tie_word_embeddings=True)
    model = probe.wrap_model(hf, tiny_tokenizer)
    assert model.unembed.weight.data_ptr() == hf.model.language_model.embed_tokens.weight.data_ptr()
    assert_lens_final(model)
    # and the same VLM with its head untied by hand is refused
    hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
    with pytest.raises(probe.UnsupportedArchitectureError):
        probe.wrap_model(hf, tiny_tokenizer)


def test_4_checkpoint_without_head_fails_to_load(tiny_tokenizer, tmp_path):
    """transformers PR #43429: loading a checkpoint whose untied lm_head is missing (it would be
    randomly initialised) must fail with ModelLoadError instead of a warning."""
    import conftest
    from safetensors.torch import load_file, save_file

    hf = conftest._tiny("llama", len(tiny_tokenizer)).eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    good = probe.load_model(str(tmp_path))  # complete checkpoint loads
    assert torch.equal(good.unembed.weight, hf.lm_head.weight)
    st = tmp_path / "model.safetensors"
    state = load_file(st)
    assert "lm_head.weight" in state
    del state["lm_head.weight"]
    save_file(state, st, metadata={"format": "pt"})
    with pytest.raises(probe.ModelLoadError, match="lm_head"):
        probe.load_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 5. tensor vs tuple layer outputs


def test_5_get_resid_tensor_and_tuple():
    """nnterp PR #17 (nnterp #16, nnsight #535): a bare tensor and ``(tensor,)`` give the same
    residual; indexing ``[0]`` on a bare tensor (batch row 0) is rejected, not used."""
    h = torch.randn(2, 4, 64)
    assert probe.get_resid(h) is h
    assert probe.get_resid((h,)) is h
    assert probe.get_resid([h, None]) is h
    assert probe.get_resid(h, batch_size=2).shape == (2, 4, 64)
    with pytest.raises(ValueError):
        probe.get_resid(h[0])  # what ``output[0]`` on a bare tensor would give
    with pytest.raises(ValueError):
        probe.get_resid(h, batch_size=3)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("prompts", [[P1], [P1, P3]])
def test_5_residual_stream_shapes(make_tiny, kind, prompts):
    """nnterp PR #17: extracted residuals are ``(B, L, d)`` for B=1 and B=2 on families with tensor
    and tuple layer outputs, and equal a forward hook's view of the layer output."""
    model = make_tiny(kind)
    B = len(prompts)
    resid = probe.residual_stream(model, prompts)
    assert resid.shape == (B, model.n_layers, 64)
    n = min(n_tokens(model, p) for p in prompts)
    full = probe.residual_stream(model, prompts, positions=list(range(-n, 0)))
    assert full.shape == (B, model.n_layers, n, 64)

    seen = {}
    handle = model.layer_module(0).register_forward_hook(lambda m, i, o: seen.setdefault("h", probe.get_resid(o)))
    try:
        _, batch = own_logits(model, prompts)
    finally:
        handle.remove()
    assert seen["h"].shape == (B, batch.seq_len, 64)
    rows = torch.arange(B)
    assert torch.allclose(resid[:, 0], seen["h"][rows, batch.last_index()], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. padding and positions


def test_6_batched_equals_single_gpt2(make_tiny):
    """nnsight #672 (PR #673): batched prompts of different lengths on an absolute-position model
    (GPT-2) must give the same residuals, lens and logits as single runs."""
    model = make_tiny("gpt2")
    lens_ = {p: n_tokens(model, p) for p in PROMPTS}
    assert len(set(lens_.values())) > 1, "prompts must differ in length"
    batched = probe.residual_stream(model, PROMPTS)
    single = torch.cat([probe.residual_stream(model, p) for p in PROMPTS])
    assert (batched - single).abs().max().item() < 1e-4
    lb, ls = probe.logit_lens(model, batched), probe.logit_lens(model, single)
    assert (lb - ls).abs().max().item() < 1e-4
    assert torch.equal(lb.argmax(-1), ls.argmax(-1))

    for side in ("left", "right"):
        logits, batch = own_logits(model, PROMPTS, padding_side=side)
        got = logits[torch.arange(3), batch.last_index()]
        for i, p in enumerate(PROMPTS):
            want, _ = own_logits(model, [p])
            assert (got[i] - want[0, -1]).abs().max().item() < 1e-4
            assert got[i].argmax() == want[0, -1].argmax()


def test_6_missing_position_ids_would_be_caught(make_tiny):
    """nnsight #672: without mask-derived position_ids a left-padded GPT-2 batch drifts; this shows
    the equality check above can fail."""
    model = make_tiny("gpt2")
    batch = probe.encode(model, PROMPTS)
    shortest = int(batch.lengths.argmin())
    with torch.no_grad():
        naive = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
        want = model.hf(input_ids=probe.encode(model, [PROMPTS[shortest]]).input_ids).logits[0, -1]
    assert (naive[shortest] - want).abs().max().item() > 1e-3


def test_6_last_index_left_and_right_padding(make_tiny):
    """nnsight #672 / LatentMAS PR #26 / sentence-transformers PR #2111: the last real token is
    T-1 under left padding and length-1 under right padding, also for the row without padding."""
    model = make_tiny("gpt2")
    lengths = [n_tokens(model, p) for p in PROMPTS]
    T = max(lengths)
    left = probe.encode(model, PROMPTS)
    assert left.seq_len == T
    assert left.last_index().tolist() == [T - 1] * 3
    right = probe.encode(model, PROMPTS, padding_side="right")
    assert right.last_index().tolist() == [n - 1 for n in lengths]
    full_row = lengths.index(T)
    assert right.last_index()[full_row] == T - 1
    # the id at the last index is each prompt's last token, under both paddings
    for b in (left, right):
        for i, p in enumerate(PROMPTS):
            assert b.input_ids[i, b.last_index()[i]] == tokenize(model.tokenizer, p)[-1]
    # position ids of real tokens are 0..n-1 under both paddings
    for b in (left, right):
        for i, n in enumerate(lengths):
            assert b.position_ids[i][b.attention_mask[i].bool()].tolist() == list(range(n))


# ---------------------------------------------------------------------------------------------
# 8. answer ids in context


def _check_in_context(tok, prompt, answer, want_first):
    ids = probe.answer_ids(tok, prompt, answer)
    specials = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} - {None}
    assert not specials & set(ids)
    assert tok.decode([ids[0]]) == want_first
    assert tok.decode(ids) == " " + answer
    p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    full = tok(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    assert full == p_ids + ids  # prompt ids are a prefix, answer ids are what follows
    return ids


def test_8_answer_ids_in_context_tiny(tiny_tokenizer):
    """EasyEdit #390 / #247: answer ids come from tokenising prompt + " " + answer; the first
    answer token carries the leading space and no BOS/EOS appears inside."""
    ids = _check_in_context(tiny_tokenizer, P1, "Paris", " Paris")
    assert ids != tiny_tokenizer("Paris", add_special_tokens=False)["input_ids"]
    multi = _check_in_context(tiny_tokenizer, P1, "Japan", " J")
    assert len(multi) > 1
    with pytest.raises(probe.InputError):
        probe.answer_ids(tiny_tokenizer, P1, "   ")


@pytest.fixture(scope="module")
def sentencepiece_tokenizers(tmp_path_factory):
    """A tiny SentencePiece BPE model loaded fast (tokenizers backend) and slow (sentencepiece)."""
    spm = pytest.importorskip("sentencepiece")
    import conftest
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(conftest.CORPUS * 20), model_prefix=str(d / "tokenizer"),
                                   vocab_size=120, model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    fast = AutoTokenizer.from_pretrained(d)
    slow = SentencePieceBackend(vocab_file=str(d / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")
    return fast, slow


def test_8_fast_and_slow_sentencepiece_agree(sentencepiece_tokenizers):
    """EasyEdit #390: fast and slow SentencePiece tokenizers give identical in-context answer ids,
    the first one the word-start piece '▁Paris', and no BOS/EOS inside."""
    fast, slow = sentencepiece_tokenizers
    assert "Backend" in type(slow).__mro__[0].__name__ or "SentencePiece" in type(slow).__name__
    assert type(fast) is not type(slow)
    for prompt, answer in [(P1, "Paris"), ("The city famous for its Carnival in Brazil is", "Rio de Janeiro")]:
        a_fast = probe.answer_ids(fast, prompt, answer)
        a_slow = probe.answer_ids(slow, prompt, answer)
        assert a_fast == a_slow
        for tok, ids in ((fast, a_fast), (slow, a_slow)):
            assert tok.convert_ids_to_tokens(ids[0]).startswith("▁")
            assert not {tok.bos_token_id, tok.eos_token_id} & set(ids)
            assert tok.decode(ids).strip() == answer
    assert fast.convert_ids_to_tokens(probe.answer_ids(fast, P1, "Paris")) == ["▁Paris"]


@pytest.mark.real
def test_8_answer_ids_in_context_smollm2(smollm2):
    """EasyEdit #390 / #247 on the real SmolLM2 tokenizer: " Paris" with its leading space, no
    BOS/EOS inside the answer ids."""
    tok = smollm2.tokenizer
    ids = _check_in_context(tok, P1, "Paris", " Paris")
    assert ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    multi = _check_in_context(tok, "The city famous for its Carnival in Brazil is", "Rio de Janeiro", " Rio")
    assert len(multi) >= 2
    assert set(multi).isdisjoint(set(tok.all_special_ids))


# ---------------------------------------------------------------------------------------------
# 9. multi-token metrics


def test_9_multi_token_metrics_mocked(make_tiny):
    """EasyEdit #434 / ROME PR #1: per fact we report first-token probability, full-answer
    log-probability (sum over tokens), exact match (all tokens) and token accuracy. A model that
    always predicts the first answer token gets 1 of 3 tokens right: token_acc 1/3, no exact
    match, first-token rank 1."""
    from probe.readout import lens_readout

    model = make_tiny("gptj")  # GPT-J's lm_head has a bias: zero the final norm -> logits == bias
    prompt, answer = P1, "Japan"
    ids = probe.answer_ids(model.tokenizer, prompt, answer)
    assert len(ids) == 3 and len(set(ids)) == 3
    bias = torch.zeros(model.vocab_size)
    bias[ids[0]] = 5.0
    bias[ids[1]] = 1.0
    bias[ids[2]] = -1.0
    with torch.no_grad():
        model.hf.transformer.ln_f.weight.zero_()
        model.hf.transformer.ln_f.bias.zero_()
        model.hf.lm_head.bias.copy_(bias)
    lp = torch.log_softmax(bias, -1)

    (r,) = lens_readout(model, [prompt], [answer])
    assert r.exact_match is False
    assert r.token_acc == pytest.approx(1 / 3)
    assert r.rank == [1] * model.n_layers
    assert r.first_token_prob == pytest.approx(lp[ids[0]].exp().item(), rel=1e-5)
    assert r.token_logprobs == pytest.approx([lp[i].item() for i in ids], abs=1e-5)
    assert r.answer_logprob == pytest.approx(sum(r.token_logprobs), abs=1e-5)
    assert r.prob[-1] == pytest.approx(r.first_token_prob, rel=1e-5)

    # control: a one-token answer that is the greedy choice is an exact match with token_acc 1
    one = probe.answer_ids(model.tokenizer, prompt, "Paris")
    assert len(one) == 1
    bias2 = torch.zeros(model.vocab_size)
    bias2[one[0]] = 5.0
    with torch.no_grad():
        model.hf.lm_head.bias.copy_(bias2)
    (r1,) = lens_readout(model, [prompt], ["Paris"])
    assert r1.exact_match is True and r1.token_acc == 1.0 and r1.rank[-1] == 1
    (r2,) = lens_readout(model, [prompt], [answer])  # now no answer token is greedy
    assert r2.exact_match is False and r2.token_acc == 0.0 and r2.rank[-1] > 1


def test_9_multi_token_metrics_consistent_on_random_model(tiny_llama):
    """EasyEdit #434: on a real forward the sum of per-token log-probs equals the reported full
    log-probability, and token_acc is a fraction of the answer's tokens."""
    from probe.readout import lens_readout, sequence_logprobs

    prompts, answers = [P1, "The city famous for its Carnival in Brazil is"], ["Japan", "Rio de Janeiro"]
    out = lens_readout(tiny_llama, prompts, answers)
    seq = sequence_logprobs(tiny_llama, prompts, answers)
    for r, s, p, a in zip(out, seq, prompts, answers):
        n = len(probe.answer_ids(tiny_llama.tokenizer, p, a))
        assert len(r.token_logprobs) == n == len(s)
        assert r.answer_logprob == pytest.approx(float(s.sum()), abs=1e-4)
        assert r.first_token_prob == pytest.approx(float(s[0].exp()), rel=1e-4)
        assert round(r.token_acc * n) == pytest.approx(r.token_acc * n, abs=1e-6)
        assert r.exact_match == (r.token_acc == 1.0)


# ---------------------------------------------------------------------------------------------
# 10. answer matching


@pytest.mark.parametrize("pred,gold,want", [
    ("B", "A", False),
    ("a", "A", True),
    ("A", "A", True),
    ("  paris ", "Paris", True),
    ("hello  world", "hello world", True),
    ("The Beatles", "Beatles", True),
    ("Beatles", "The Beatles", True),
    ("1492", "1492", True),
    ("US", "US", True),
    ("answer: A", "A", True),
    ("Bob", "A", False),
    ("", "A", False),
    ("the", "A", False),
    ("Parisian", "Paris", False),
    ("ｐａｒｉｓ", "Paris", True),  # NFKC full-width
])
def test_10_answer_matches(pred, gold, want):
    """UltraRAG #509 (PR #510), openagent-eval #225: normalisation (NFKC, casefold, collapse
    whitespace, strip) never empties an answer, so matching is never vacuous; word-boundary match."""
    from attacks.matching import answer_matches

    assert answer_matches(pred, gold) is want


def test_10_normalize_answer_never_empties():
    """UltraRAG #509: gold "A" must not normalise to the empty string."""
    from attacks.matching import normalize_answer

    assert normalize_answer("  Hello   World ") == "hello world"
    assert normalize_answer("A") != ""
    assert normalize_answer("The") != ""
    assert normalize_answer("ＡＢＣ") == "abc"


def test_10_articles_only_dropped_when_asked():
    """UltraRAG #509: article-insensitive matching is an option."""
    from attacks.matching import answer_matches

    assert answer_matches("Beatles", "The Beatles", drop_articles=True) is True
    assert answer_matches("Beatles", "The Beatles", drop_articles=False) is False


@pytest.mark.parametrize("gold", ["", "   "])
def test_10_empty_gold_raises(gold):
    """UltraRAG #509: an empty gold answer is rejected, never matched vacuously."""
    from attacks.matching import answer_matches

    with pytest.raises(ValueError):
        answer_matches("x", gold)


def test_10_empty_answer_rejected_at_load(tmp_path):
    """UltraRAG #509: an empty gold answer is rejected at JSONL load time with its line number."""
    f = tmp_path / "facts.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": P1, "answer": "Paris"}) + "\n"
                 + json.dumps({"id": "b", "prompt": "x", "answer": ""}) + "\n")
    with pytest.raises(probe.InputError) as ei:
        probe.facts.load_jsonl(f)
    assert ei.value.line == 2 and ei.value.field == "answer"
    assert str(f) in str(ei.value) and ":2" in str(ei.value) and "'answer'" in str(ei.value)


# ---------------------------------------------------------------------------------------------
# 13. bf16 precision


def _fp64_lens_logprobs(model_bf16, resid):
    norm = model_bf16.final_norm
    x = resid.double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    logits = x @ model_bf16.unembed.weight.double().T
    return torch.log_softmax(logits, -1)


def test_13_bf16_lens_in_fp32(make_tiny):
    """genlm-backend PR #66; transformers #30236 / #31267: a bf16 model's lens runs in fp32, so
    tail log-probabilities match an fp64 reference on the same weights within 1e-3 nats,
    probabilities sum to 1, and layer-to-layer probability deltas match within 1e-4."""
    hf = make_tiny("llama").hf.to(torch.bfloat16)
    model = probe.wrap_model(hf, make_tiny("llama").tokenizer)
    assert model.dtype == torch.bfloat16
    resid = probe.residual_stream(model, [P1, P2])  # [2, 2, 64]
    lp = probe.logit_lens(model, resid)
    assert lp.dtype == torch.float32
    ref = _fp64_lens_logprobs(model, resid)
    tail = ref.argsort(-1)[..., :10]
    assert (lp.double().gather(-1, tail) - ref.gather(-1, tail)).abs().max().item() < 1e-3
    assert (lp.double() - ref).abs().max().item() < 1e-3
    assert (lp.exp().sum(-1) - 1).abs().max().item() < 1e-5
    delta = lp.exp()[:, 1] - lp.exp()[:, 0]
    ref_delta = ref.exp()[:, 1] - ref.exp()[:, 0]
    assert (delta.double() - ref_delta).abs().max().item() < 1e-4
    # the model's weights were not upcast in place by the lens
    assert model.unembed.weight.dtype == torch.bfloat16
    assert model.final_norm.weight.dtype == torch.bfloat16


def test_13_bf16_synthetic_tail(tiny_tokenizer):
    """genlm-backend PR #66: logits N(0, 5) over 32 000 tokens held in bf16. Our lens path
    (fp32 log-softmax) matches the reference within 1e-3 nats in the tail; a bf16 log-softmax
    would not."""
    import transformers as tf

    torch.manual_seed(0)
    V, d = 32000, 64
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=0.0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    z = (torch.randn(V) * 5).to(torch.bfloat16)
    with torch.no_grad():
        hf.model.norm.weight.zero_()
        hf.model.norm.weight[0] = 1.0 / 8.0  # RMSNorm(e_0) = 8 e_0 * w = e_0
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[:, 0] = z.float()
    hf = hf.to(torch.bfloat16)
    model = probe.wrap_model(hf, tiny_tokenizer)
    e0 = torch.zeros(d)
    e0[0] = 1.0
    assert torch.equal(probe.lens_logits(model, e0), z.float())  # the lens sees the bf16 logits exactly
    ours = probe.logit_lens(model, e0)
    assert ours.dtype == torch.float32
    ref = torch.log_softmax(z.double(), -1)
    tail = ref.argsort()[:100]
    assert (ours.double()[tail] - ref[tail]).abs().max().item() < 1e-3
    assert abs(ours.exp().sum().item() - 1) < 1e-5
    bf16_path = torch.log_softmax(z, -1).double()
    assert (bf16_path[tail] - ref[tail]).abs().max().item() > 1e-2  # the bug this guards against


# ---------------------------------------------------------------------------------------------
# 14. saved values are real tensors; early stop keeps earlier layers


def test_14_saved_residuals_are_tensors(tiny_llama):
    """nnsight #486 / #399 / #114: per-layer residuals collected in one trace come back as real
    tensors equal to HF's hidden states (layer 0: ``hidden_states[1]``; last layer: the pre-norm
    output of the last decoder layer); stopping after layer 0 keeps layer 0 intact."""
    model = tiny_llama
    prompts = [P1, P2]
    resid = probe.residual_stream(model, prompts, layers=[0, 1])
    assert type(resid) is torch.Tensor and resid.shape == (2, 2, 64)

    last = {}
    handle = model.layer_module(1).register_forward_hook(lambda m, i, o: last.setdefault("h", probe.get_resid(o)))
    batch = probe.encode(model, prompts)
    try:
        with torch.no_grad():
            out = model.hf(**batch.model_inputs(), output_hidden_states=True)
    finally:
        handle.remove()
    rows, idx = torch.arange(2), batch.last_index()
    assert (resid[:, 0] - out.hidden_states[1][rows, idx]).abs().max().item() < 1e-6
    assert (resid[:, 1] - last["h"][rows, idx]).abs().max().item() < 1e-6

    fired = []
    handle = model.layer_module(1).register_forward_hook(lambda *a: fired.append(1))
    try:
        only0 = probe.residual_stream(model, prompts, layers=[0])
    finally:
        handle.remove()
    assert type(only0) is torch.Tensor and only0.shape == (2, 1, 64)
    assert fired == []  # the trace stopped after layer 0
    assert (only0[:, 0] - resid[:, 0]).abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------
# 15. hooks and edits are scoped


def test_15_edit_cleanup_after_error(tiny_llama):
    """TransformerLens PR #156, issues #1636 / #1323: an edit whose function raises is removed in
    ``finally``; hooks the user installed before are untouched and still fire; later runs are clean."""
    model = tiny_llama
    baseline, _ = own_logits(model, [P1, P2])
    calls = []
    handle = model.layer_module(1).register_forward_hook(lambda *a: calls.append(1))
    try:
        hooks_before = hook_count(model.hf)
        edits_before = len(getattr(model.nn, "_edits", []))

        def boom(h, layer):
            raise ValueError("patch failed")

        with pytest.raises(ValueError, match="patch failed"):
            with probe.edit_residual(model, [0], fn=boom):
                probe.residual_stream(model, [P1, P2])
        assert hook_count(model.hf) == hooks_before
        assert len(getattr(model.nn, "_edits", [])) == edits_before

        with pytest.raises(ValueError):  # wrong-size steering vector: same guarantee
            with probe.edit_residual(model, [0], add=torch.randn(63)):
                probe.residual_stream(model, [P1])
        assert hook_count(model.hf) == hooks_before
        assert len(getattr(model.nn, "_edits", [])) == edits_before

        n = len(calls)
        after, _ = own_logits(model, [P1, P2])
        assert len(calls) == n + 1  # the user's hook still fires
        assert torch.equal(after, baseline)
        resid_after = probe.residual_stream(model, [P1, P2])
        assert len(calls) == n + 2
    finally:
        handle.remove()
    resid_clean = probe.residual_stream(model, [P1, P2])
    assert torch.equal(resid_after, resid_clean)


def test_15_project_out_and_add(tiny_llama):
    """TransformerLens PR #156: edits apply inside the block only: project_out leaves no component
    along the direction, add shifts by exactly the vector, and both vanish on exit."""
    model = tiny_llama
    torch.manual_seed(1)
    d, v = torch.randn(64), torch.randn(64)
    u = d / d.norm()
    n = min(n_tokens(model, p) for p in (P1, P2))
    pos = list(range(-n, 0))
    base = probe.residual_stream(model, [P1, P2], positions=pos)  # [2, 2, n, 64]
    assert (base[:, 0] @ u).abs().max().item() > 1e-2
    with probe.edit_residual(model, 0, project_out=d):
        proj = probe.residual_stream(model, [P1, P2], positions=pos)
    assert (proj[:, 0] @ u).abs().max().item() < 1e-4
    assert torch.allclose(proj[:, 0], base[:, 0] - (base[:, 0] @ u)[..., None] * u, atol=1e-5)
    with probe.edit_residual(model, [0], add=v, scale=2.0):
        added = probe.residual_stream(model, [P1, P2], positions=pos)
    assert (added[:, 0] - (base[:, 0] + 2.0 * v)).abs().max().item() < 1e-5
    assert (added[:, 1] - base[:, 1]).abs().max().item() > 1e-2  # propagates to the next layer
    assert torch.equal(probe.residual_stream(model, [P1, P2], positions=pos), base)


def test_15_nested_edits(tiny_llama):
    """TransformerLens #1636: nested contexts are isolated; leaving the inner one keeps the outer
    edit, also when the inner block raises."""
    model = tiny_llama
    torch.manual_seed(2)
    v1, v2 = torch.randn(64), torch.randn(64)
    edits = lambda: len(getattr(model.nn, "_edits", []))  # noqa: E731
    n0 = edits()
    base = probe.residual_stream(model, P1)
    with probe.edit_residual(model, [0], add=v1):
        n1 = edits()
        outer = probe.residual_stream(model, P1)
        with probe.edit_residual(model, [0], add=v2):
            assert edits() > n1
            both = probe.residual_stream(model, P1)
        assert edits() == n1
        back = probe.residual_stream(model, P1)
        with pytest.raises(RuntimeError):
            with probe.edit_residual(model, [1], add=v2):
                assert edits() > n1
                raise RuntimeError("inner")
        assert edits() == n1
        still = probe.residual_stream(model, P1)
    final = probe.residual_stream(model, P1)
    assert n1 > n0
    assert (outer[:, 0] - (base[:, 0] + v1)).abs().max().item() < 1e-5
    assert (both[:, 0] - (base[:, 0] + v1 + v2)).abs().max().item() < 1e-5
    assert torch.allclose(back, outer, atol=1e-6) and torch.allclose(still, outer, atol=1e-6)
    assert torch.equal(final, base)
    assert edits() == n0


def test_15_error_in_block_removes_edit(tiny_llama):
    """TransformerLens PR #156: an exception raised by the user's code inside the block (after the
    edit was installed) still removes the edit, and only it."""
    model = tiny_llama
    edits = lambda: len(getattr(model.nn, "_edits", []))  # noqa: E731
    n0 = edits()
    base = probe.residual_stream(model, [P1, P2])
    with pytest.raises(KeyError):
        with probe.edit_residual(model, [0, 1], add=torch.ones(64)):
            inside = probe.residual_stream(model, [P1, P2])
            assert edits() > n0
            raise KeyError("user error")
    assert (inside[:, 0] - base[:, 0] - 1).abs().max().item() < 1e-5
    assert edits() == n0
    assert torch.equal(probe.residual_stream(model, [P1, P2]), base)


# ---------------------------------------------------------------------------------------------
# R1. defense training: gradients, frozen weights, restore


def test_R1_constrained_ft_edits_only_its_weight(tiny_llama):
    """nnsight #539 / PR #699 / #473: defense training has one backward per step with a finite,
    non-zero gradient on the trainable weight; everything else is bitwise frozen, the caller's
    model never changes and ``restore()`` is bit-identical."""
    import defenses

    model = tiny_llama
    original = {k: v.detach().clone() for k, v in model.hf.state_dict().items()}
    editor = defenses.ConstrainedFineTune(layer=0, steps=3, lr=1e-2, norm_bound=1e-2, early_stop=None,
                                          retain_weight=0)
    sess = editor.session(model)
    name = sess.param_name
    assert name == "model.layers.0.mlp.down_proj.weight"
    grads = []
    hook = sess.param.register_hook(lambda g: grads.append(g.detach().clone()))
    info = editor.edit(sess, defenses.FactErasure(),
                       defenses.DeletionRequest(prompts=[P1, P2], answers=["Paris", "oxygen"]))
    assert info.steps == 4 and len(info.losses) == 4  # 3 updates, then a pass measuring the last one
    assert all(torch.isfinite(torch.tensor(info.losses)))
    assert info.losses[-1] < info.losses[0]

    w = sess.param.detach()
    w0 = original[name]
    change = (w - w0).abs().max().item()
    assert change > 0
    assert change <= 1e-2 * (1 + 1e-5) + 1e-7
    assert info.max_abs_change == pytest.approx(change)
    hook.remove()
    assert len(grads) == 3  # one backward per update
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in grads)
    assert sess.param.grad is None  # freed after the edit

    clone_state = sess.model.hf.state_dict()
    for k, v in clone_state.items():
        if k != name:
            assert torch.equal(v, original[k]), k
    for k, p in sess.model.hf.named_parameters():
        if k != name:
            assert p.grad is None, k
    for k, v in model.hf.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, original[k]), k

    sess.restore()
    assert torch.equal(sess.param.detach(), w0)
    assert sess.max_abs_change() == 0.0
    for k, v in model.hf.state_dict().items():
        assert torch.equal(v, original[k]), k


# ---------------------------------------------------------------------------------------------
# R2. memory: only the requested positions are kept


@pytest.mark.parametrize("B", [16, 32])
def test_R2_saved_bytes_scale_with_batch(make_tiny, B):
    """nnsight #396: residual capture keeps only the last position: exactly B x L x d fp32 values."""
    model = make_tiny("gpt2")
    resid = probe.residual_stream(model, [P1] * B)
    L, d = model.n_layers, model.d_model
    assert resid.shape == (B, L, d) and resid.dtype == torch.float32
    assert resid.nbytes == B * L * d * 4
    assert resid.untyped_storage().nbytes() == B * L * d * 4  # no hidden full-sequence buffer


def test_R2_batch_size_chunking(make_tiny):
    """nnsight #396: ``batch_size`` chunks the prompts without changing the values."""
    model = make_tiny("gpt2")
    prompts = PROMPTS * 3
    one = probe.residual_stream(model, prompts, batch_size=32)
    chunked = probe.residual_stream(model, prompts, batch_size=2)
    assert one.shape == chunked.shape == (9, 2, 64)
    assert (one - chunked).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------------------------
# R3. empty prompts, Unicode


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_R3_empty_prompt_rejected(tiny_llama, prompt):
    """nnsight #608 (PR #609): an empty or whitespace prompt gets a clear InputError, not a deep failure."""
    with pytest.raises(probe.InputError, match="empty"):
        probe.encode(tiny_llama, [P1, prompt])
    with pytest.raises(probe.InputError):
        probe.residual_stream(tiny_llama, prompt)


def test_R3_empty_prompts_in_jsonl(tmp_path):
    """nnsight #608: the JSONL loader names the line of an empty (line 1) or whitespace (line 2) prompt."""
    good = json.dumps({"id": "u", "prompt": "Ça va ? 東京は日本の首都です。", "answer": "Tokyo"})
    for lineno, lines in [(1, [json.dumps({"id": "e", "prompt": "", "answer": "x"}), good]),
                          (2, [good, json.dumps({"id": "w", "prompt": "   ", "answer": "x"})])]:
        f = tmp_path / f"facts{lineno}.jsonl"
        f.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(probe.InputError) as ei:
            probe.facts.load_jsonl(f)
        assert ei.value.line == lineno and ei.value.field == "prompt"
        assert f"{f}:{lineno}" in str(ei.value)


def test_R3_unicode_round_trip(tiny_llama, tmp_path):
    """nnsight #608: Unicode prompts are accepted and round-trip through byte-level BPE."""
    text = "Ça va ? 東京は日本の首都です。"
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"id": "u", "prompt": text, "answer": "Tokyo"}, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    (fact,) = probe.facts.load_jsonl(f)
    assert fact.prompt == text
    ids = tokenize(tiny_llama.tokenizer, fact.prompt)
    assert len(ids) >= 1
    assert tiny_llama.tokenizer.decode(ids) == text
    batch = probe.encode(tiny_llama, [text])
    assert batch.input_ids[0].tolist() == ids
    assert probe.residual_stream(tiny_llama, text).shape == (1, 2, 64)


# ---------------------------------------------------------------------------------------------
# R4. context length


def test_R4_too_long_prompt_fails_before_forward(make_tiny):
    """yandexdataschool/nlp_course PR #105; transformers #530: a prompt longer than GPT-2's learned
    positions (tiny: 64) is rejected with PromptTooLongError before any forward pass."""
    from probe.readout import lens_readout

    model = make_tiny("gpt2")
    assert model.context_length == 64
    long = "word " * 100 + P1
    assert n_tokens(model, long) > 64
    calls = []
    handle = model.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(probe.PromptTooLongError):
            probe.residual_stream(model, [P1, long])
        with pytest.raises(probe.PromptTooLongError):
            probe.encode(model, long)
        with pytest.raises(probe.PromptTooLongError):
            lens_readout(model, [long], ["Paris"])
        assert calls == []
        encode_ids(model, [[5] * 64])  # exactly the context fits
        with pytest.raises(probe.PromptTooLongError, match="64"):
            encode_ids(model, [[5] * 65])
    finally:
        handle.remove()


def test_R4_check_lengths_names_file_line_field(make_tiny, tmp_path):
    """yandexdataschool/nlp_course PR #105: the facts check names the file, line and field."""
    from probe.facts import check_lengths, load_jsonl

    model = make_tiny("gpt2")
    long = "word " * 100 + P1
    f = tmp_path / "facts.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "ok", "prompt": P1, "answer": "Paris"}),
        json.dumps({"id": "para", "prompt": P1, "answer": "Paris", "paraphrases": [P3, long]}),
    ]) + "\n")
    facts = load_jsonl(f)
    check_lengths(model, facts[:1])  # short facts pass
    with pytest.raises(probe.PromptTooLongError) as ei:
        check_lengths(model, facts)
    err = ei.value
    assert err.file == str(f) and err.line == 2 and err.field == "paraphrases[1]"
    assert f"{f}:2" in str(err) and "paraphrases[1]" in str(err)
    f.write_text(json.dumps({"id": "long", "prompt": long, "answer": "Paris"}) + "\n")
    with pytest.raises(probe.PromptTooLongError) as ei:
        check_lengths(model, load_jsonl(f))
    assert ei.value.line == 1 and ei.value.field == "prompt"
