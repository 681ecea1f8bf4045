"""Models spread over devices (issue 13 item 5): ``load_model(..., device_map=...)`` through accelerate.

This machine has one device (the CPU), so the spread is exercised with accelerate's disk offload:
layers whose weights live on ``meta`` and are streamed in by accelerate's hooks at each forward --
the same hook path as layers on another GPU. A ``device_map`` of devices only ("auto" here puts
everything on the CPU) must change nothing, editing included; an offloaded weight cannot be edited
and is refused in one line. The GPU path runs in ``tests/device/check.sh``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import probe
from attacks import HeadProjection, ProbabilityDelta, attack_readout
from defenses import DeletionRequest, make_editor, make_objective
from probe.errors import ModelLoadError
from probe.model import dispatch, execution_device, offloaded

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of France is", "The capital of Japan is"]
ANSWERS = ["Paris", "Paris", "Tokyo"]


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    """The same random 4-layer Llama twice: as is, and with layers 1-2 offloaded to disk."""
    import conftest

    hf = conftest._tiny("llama", len(tiny_tokenizer), num_hidden_layers=4, initializer_range=0.3).eval()
    plain = probe.wrap_model(hf, tiny_tokenizer, name="tiny")
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    spread = probe.load_model(copy.deepcopy(hf), tokenizer=tiny_tokenizer, device_map=dm)
    return plain, spread


def test_offloaded_layers_are_streamed_in(pair):
    plain, spread = pair
    off = offloaded(spread)
    assert off and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in off)
    assert execution_device(spread.module("model.layers.1")) == torch.device("cpu") == spread.device
    assert torch.equal(probe.residual_stream(plain, PROMPTS), probe.residual_stream(spread, PROMPTS))


def test_lens_attacks_across_devices(pair):
    plain, spread = pair
    attacks = [HeadProjection(), ProbabilityDelta()]
    a = attack_readout(plain, PROMPTS, ANSWERS, attacks)
    b = attack_readout(spread, PROMPTS, ANSWERS, attacks)
    assert [r.attack_ranks for r in a] == [r.attack_ranks for r in b]
    assert [r.rank for r in a] == [r.rank for r in b]
    assert len({str(r.attack_ranks) for r in a}) > 1  # the facts differ: the comparison has teeth


def test_offloaded_weights_cannot_be_edited(pair):
    _, spread = pair
    with pytest.raises(ModelLoadError, match="offloaded"):
        make_editor("constrained-ft", layer=3).session(spread)


def test_auto_device_map_changes_nothing_edits_included(tiny_tokenizer):
    import conftest

    hf = conftest._tiny("llama", len(tiny_tokenizer), num_hidden_layers=2, initializer_range=0.3).eval()
    plain = probe.wrap_model(hf, tiny_tokenizer, name="tiny")
    auto = probe.load_model(copy.deepcopy(hf), tokenizer=tiny_tokenizer, device_map="auto")
    assert set(auto.hf.hf_device_map.values()) == {"cpu"} and not offloaded(auto)
    with torch.no_grad():
        logits = plain.hf(torch.tensor([probe.tokens.tokenize(plain.tokenizer, PROMPTS[1])])).logits[0, -1]
    top = next(w for t in logits.argsort(descending=True).tolist()  # the model's own answer, one token
               for w in [plain.tokenizer.decode([t]).strip()]
               if w.isalpha() and probe.tokens.answer_ids(plain.tokenizer, PROMPTS[1], w) == [t])
    req = DeletionRequest([PROMPTS[1]], [top], [PROMPTS[2]])
    out = []
    for m in (plain, auto):
        torch.manual_seed(0)
        editor = make_editor("constrained-ft", layer=1, steps=3, lr=1e-2, early_stop=None)
        with editor.applied(m, make_objective("fact-erasure"), req) as applied:
            out.append(dict(applied.model.hf.named_parameters())[editor.param_name(m)].detach().clone())
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], hf.model.layers[1].mlp.down_proj.weight)


def test_bad_device_maps_are_one_line_errors(tiny_tokenizer):
    import conftest

    hf = conftest._tiny("llama", len(tiny_tokenizer)).eval()
    with pytest.raises(ModelLoadError, match="device_map 'everywhere': use one of auto"):
        dispatch(hf, "everywhere")
    with pytest.raises(ModelLoadError, match=r"modules the model lacks: \['model.layers.9'\]"):
        dispatch(hf, {"model.layers.9": "cpu"})
    # the lenses read the unembedding's weights: it cannot be offloaded
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu",
          "lm_head": "disk"}
    with pytest.raises(ModelLoadError, match="offloads lm_head: the embedding, final norm and unembedding"):
        dispatch(copy.deepcopy(hf), dm)
