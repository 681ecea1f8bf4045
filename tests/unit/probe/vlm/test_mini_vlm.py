"""The embedded multimodal default: the mini VLM (trained vision tower + projector shipped in the
repository, frozen SmolLM2-135M) and its training command."""

from __future__ import annotations

import pytest
import torch

import probe
from probe.images import ImagePrompt, image_token_count, is_multimodal
from probe.vlm import mini_vlm


def test_weights_are_shipped_and_small():
    assert mini_vlm.WEIGHTS.is_file()
    assert mini_vlm.WEIGHTS.stat().st_size <= 25 * 2**20
    blob = torch.load(mini_vlm.WEIGHTS, map_location="cpu", weights_only=True)
    assert blob["format"] == "probe-attack mini-vlm v1"
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in blob["state"])
    assert blob["report"]["seed"] == 0


def test_anchor_ids_take_the_last_tokens(smollm2):
    tok = smollm2.tokenizer
    ids = mini_vlm.anchor_ids(tok, "France")
    assert [tok.decode([i]) for i in ids] == ["\n", "Flag", " of", " France"]
    assert [tok.decode([i]) for i in mini_vlm.anchor_ids(tok, "South Korea")] == ["Flag", " of", " South", " Korea"]


def test_training_is_reproducible(smollm2):
    kw = dict(steps=3, batch_size=8, pool_per_country=1, countries=["France", "Japan", "Italy"], n_negatives=16)
    a = mini_vlm.trainable_state(mini_vlm.train_mini_vlm(smollm2, seed=3, **kw)[0])
    b = mini_vlm.trainable_state(mini_vlm.train_mini_vlm(smollm2, seed=3, **kw)[0])
    c = mini_vlm.trainable_state(mini_vlm.train_mini_vlm(smollm2, seed=4, **kw)[0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.real
def test_mini_vlm_loads_and_answers_from_the_image(smollm2):
    from probe.vlm import flags
    from probe.readout import last_token_logprobs
    from probe.tokens import answer_ids

    vlm = mini_vlm.load_mini_vlm(lm=smollm2)
    assert is_multimodal(vlm) and image_token_count(vlm) == mini_vlm.N_IMAGE_TOKENS == 4
    assert vlm.n_layers == 30 and vlm.vocab_size == 49153
    assert not any(p.requires_grad for p in vlm.hf.model.language_model.parameters())
    # the language model inside is SmolLM2, unchanged: text prompts answer as before
    lp_text = last_token_logprobs(vlm, ["The capital of France is"])[0, :49152]
    torch.testing.assert_close(lp_text.softmax(-1), last_token_logprobs(smollm2, ["The capital of France is"])[0]
                               .softmax(-1), rtol=0, atol=1e-4)
    # fresh easy images (seeds never used in training) of well-known flags give the right capital
    countries = ["France", "Japan", "Italy", "Germany"]
    prompts = [ImagePrompt("The capital of this country is", flags.render_image(c, "easy", 10**7 + i))
               for i, c in enumerate(countries)]
    lp = last_token_logprobs(vlm, prompts)
    answers = [flags.country(c).capital for c in countries]
    top1 = [int(lp[i].argmax()) == answer_ids(vlm.tokenizer, p, a)[0] for i, (p, a) in
            enumerate(zip(prompts, answers))]
    assert sum(top1) >= 3, top1
    # the short name loads the same weights on the same language model: same fingerprint
    assert probe.load_model("mini-vlm").fingerprint == vlm.fingerprint


def test_bad_weights_file(tmp_path, smollm2):
    from probe.errors import ModelLoadError

    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match="not a mini-VLM weights file"):
        mini_vlm.load_mini_vlm(bad, lm=smollm2)
    with pytest.raises(ModelLoadError, match="not found"):
        mini_vlm.load_mini_vlm(tmp_path / "missing.pt", lm=smollm2)
    torch.save({"state": {"vision_tower.x": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="do not match"):
        mini_vlm.load_mini_vlm(tmp_path / "wrong.pt", lm=smollm2)


def test_model_loader_registry(tmp_path, monkeypatch):
    """probe.vlm registers the mini VLM with probe.model (which never imports probe.vlm)."""
    from probe import model as pm
    from probe.errors import ModelLoadError

    assert "mini-vlm" in pm.SHORT_NAMES and pm._ALIASES["minivlm"] == pm._ALIASES["mini_vlm"] == "mini-vlm"
    with pytest.raises(ModelLoadError, match="mini-VLM weights not found"):  # a .pt path goes to the mini VLM
        probe.load_model(str(tmp_path / "missing.pt"))
    for name in ("_NAMED_LOADERS", "SHORT_NAMES", "_ALIASES", "_PATH_LOADERS"):
        monkeypatch.setattr(pm, name, type(getattr(pm, name))(getattr(pm, name)))
    calls = []

    def by_name(name, *, device):
        calls.append((name, device))
        return "M"

    def by_path(path, *, device):
        calls.append((path.name, device))
        return "P"

    pm.register_model_loader("fake-x", by_name, aliases=("fx",), description="a fake")
    pm.register_model_loader(lambda path: path.suffix == ".fake", by_path)
    assert probe.load_model("FX") == "M" and probe.load_model("w.fake", device="meta") == "P"
    assert calls == [("fake-x", "cpu"), ("w.fake", "meta")] and pm.SHORT_NAMES["fake-x"] == "a fake"


def test_train_vlm_is_a_subcommand_of_the_one_parser(tmp_path, capsys):
    from probe.cli import build_parser, main

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train-vlm", "--help"])
    assert exc.value.code == 0 and "--eval-only WEIGHTS" in capsys.readouterr().out
    args = build_parser().parse_args(["train-vlm"])
    assert (args.steps, args.batch_size, args.lr, args.seed, args.per_strength, args.out, args.eval_only) == \
        (6000, 64, 2e-3, 0, 2, None, None)
    assert main(["train-vlm", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "probe-attack: error: --steps, --batch-size and --lr must be positive"
    assert main(["train-vlm", "--out", str(tmp_path), "--steps", "1"]) == 2  # checked before any training
    err = capsys.readouterr().err.strip()
    assert err.startswith("probe-attack: error:") and "is a directory" in err and "\n" not in err
