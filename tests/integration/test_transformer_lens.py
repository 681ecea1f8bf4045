"""Cross-check of our logit lens against TransformerLens 4.3's ``TransformerBridge`` on the real SmolLM2.

TransformerLens is an independent implementation of the residual-stream read-out
(``blocks.{i}.hook_resid_post``) and of the final norm + unembedding (``ln_final``, ``unembed``).
Our residual stream (nnsight, batched, left-padded) and our lens (``probe.logit_lens``) must agree
with it on every layer.

Notes:

* The bridge mutates the HF model it wraps (it forces eager attention and swaps submodules) and
  ``model.hf`` has its ``forward`` patched by nnsight, so the bridge gets its own clean copy
  loaded from probe's fp32 safetensors cache (and its own tokenizer, so ours is never touched).
* Token ids are passed, not strings: TransformerLens prepends BOS to strings, HF/nnsight do not.
* TransformerLens runs eager attention, our model sdpa. They differ by float rounding (~1e-4
  absolute on residuals whose entries reach ~600, i.e. ~3e-7 relative), so residuals are compared
  relative to their scale; log-probabilities are compared absolutely (1e-4 nats).
"""

from __future__ import annotations

import pytest
import torch

import conftest
import probe

pytestmark = pytest.mark.real

PROMPTS = [
    "The capital of France is",
    "Danielle Darrieux's mother tongue is",
    "The Eiffel Tower is located in the city of",
    "Toyota Camry is produced by",
]
LOGPROB_ATOL = 1e-4   # nats
RESID_RTOL = 1e-5     # of the largest |entry| of each (prompt, layer) residual


def _clean_checkpoint_dir(model):
    from probe.model import smollm2_gguf_path

    d = probe.cache_dir() / "models" / f"{smollm2_gguf_path().stem}-{model.fingerprint}"
    if not (d / "config.json").is_file():
        pytest.fail(f"{d}: probe's safetensors cache of SmolLM2 is missing (load_model() should have made it)")
    return d


@pytest.fixture(scope="module")
def bridge(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conftest.block_transformer_lens_installs()
    from transformer_lens import TransformerBridge

    src = _clean_checkpoint_dir(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    return TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf, tokenizer=tok,
                                               dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def tl_reference(smollm2, bridge):
    """Per prompt (unbatched, no padding): TL residuals ``[n_layers, d]`` at the last token, the TL
    logit lens (ln_final + unembed, log-softmax) ``[n_layers, vocab]`` and TL's own final
    next-token log-probs ``[vocab]``."""
    n = smollm2.n_layers
    names = [f"blocks.{i}.hook_resid_post" for i in range(n)]
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([probe.tokens.tokenize(smollm2.tokenizer, p)])
            logits, cache = bridge.run_with_cache(ids, names_filter=lambda name: name in names)
            resid = torch.stack([cache[name][0, -1] for name in names]).float()
            lens = torch.log_softmax(bridge.unembed(bridge.ln_final(resid)).float(), -1)
            out.append((resid, lens, torch.log_softmax(logits[0, -1].float(), -1)))
    return out


@pytest.fixture(scope="module")
def ours(smollm2):
    resid = probe.residual_stream(smollm2, PROMPTS)  # one batched, left-padded trace
    return resid, probe.logit_lens(smollm2, resid)


def test_residual_stream_matches_transformer_lens(smollm2, tl_reference, ours):
    resid, _ = ours
    assert resid.shape == (len(PROMPTS), smollm2.n_layers, smollm2.d_model)
    for i, (tl_resid, _, _) in enumerate(tl_reference):
        scale = tl_resid.abs().amax(-1).clamp(min=1.0)  # [n_layers]
        rel = ((resid[i] - tl_resid).abs().amax(-1) / scale).max().item()
        assert rel <= RESID_RTOL, f"prompt {i}: residual differs from TransformerLens by {rel:.2e} (relative)"


def test_logit_lens_matches_transformer_lens(smollm2, tl_reference, ours):
    _, lens = ours
    assert lens.shape == (len(PROMPTS), smollm2.n_layers, smollm2.vocab_size)
    diff = max((lens[i] - tl_lens).abs().max().item() for i, (_, tl_lens, _) in enumerate(tl_reference))
    assert diff <= LOGPROB_ATOL, f"logit-lens log-probs differ from TransformerLens by {diff:.2e} nats"
    # and the same top-1 token at every layer wherever the top-2 gap is not within rounding
    for i, (_, tl_lens, _) in enumerate(tl_reference):
        top2 = tl_lens.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 10 * LOGPROB_ATOL
        assert torch.equal(lens[i].argmax(-1)[clear], tl_lens.argmax(-1)[clear])


def test_last_layer_lens_is_transformer_lens_output(tl_reference, ours):
    """On the last layer the lens reproduces the model's own next-token distribution."""
    _, lens = ours
    diff = max((lens[i, -1] - tl_final).abs().max().item() for i, (_, _, tl_final) in enumerate(tl_reference))
    assert diff <= LOGPROB_ATOL, f"last-layer lens differs from TransformerLens' logits by {diff:.2e} nats"


def test_load_model_takes_a_transformer_bridge(smollm2, bridge, ours):
    """A TransformerLens user hands the bridge over unchanged: ``load_model`` gives back the HF model
    it wraps, under HF's parameter names, sharing the bridge's weight tensors (no copy), with our
    residual stream; without ``tokenizer=`` the bridge's tokenizer (TransformerLens prepends BOS)."""
    from probe.model import ModelLoadError

    wrapped = probe.load_model(bridge, tokenizer=smollm2.tokenizer)
    down = wrapped.module("model.layers.3.mlp.down_proj")
    assert type(down) is torch.nn.Linear
    orig = bridge.original_model.model.layers[3].mlp._original_component.down_proj._original_component
    assert down.weight is orig.weight
    resid = probe.residual_stream(wrapped, PROMPTS)
    rel = ((resid - ours[0]).abs().amax(-1) / ours[0].abs().amax(-1).clamp(min=1.0)).max().item()
    assert rel <= RESID_RTOL
    with_bos = probe.load_model(bridge)
    assert probe.tokens.tokenize(with_bos.tokenizer, PROMPTS[0]) == bridge.to_tokens(PROMPTS[0])[0].tolist()
    assert probe.tokens.tokenize(with_bos.tokenizer, PROMPTS[0])[1:] == probe.tokens.tokenize(smollm2.tokenizer,
                                                                                              PROMPTS[0])

    # folded weights (compatibility mode) no longer compute the HF model: refused, one line
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import TransformerBridge

    src = _clean_checkpoint_dir(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)  # TransformerLens mutates the one it gets
    folded = TransformerBridge.boot_transformers("HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=hf,
                                                 tokenizer=tok, dtype=torch.float32, device="cpu")
    folded.enable_compatibility_mode()
    with pytest.raises(ModelLoadError, match="enable_compatibility_mode"):
        probe.load_model(folded, tokenizer=smollm2.tokenizer)
