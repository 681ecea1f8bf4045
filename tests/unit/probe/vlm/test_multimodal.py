"""Multimodal plumbing on a tiny random LLaVA with a real processor: image prompts, image-token
expansion, answer positions, batching, generation, edits and bad input."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

from probe.errors import InputError
from probe.images import IMAGE_TOKEN, ImagePrompt, attach_images, image_of, image_token_count, is_multimodal
from probe.readout import last_token_logprobs, sequence_logprobs
from probe.tokens import answer_ids, encode, tokenize


def test_image_prompt_keeps_image_through_concatenation(images):
    p = ImagePrompt("The capital of this country is", images[0])
    for q in ("A man who was. " + p, p + " Paris", p + ImagePrompt(" x", images[0])):
        assert isinstance(q, ImagePrompt) and q.image == images[0]
    assert str("A. " + p) == "A. The capital of this country is"
    assert type(str(p)) is str and image_of(str(p)) is None
    assert f"{p}!" == "The capital of this country is!" and image_of(f"{p}!") is None
    with pytest.raises(InputError):
        _ = p + ImagePrompt(" x", images[1])
    # equality and hashing include the image: same text, other image = another prompt
    q = ImagePrompt(str(p), images[1])
    assert p != q and p == ImagePrompt(str(p), images[0]) and p != str(p)
    assert len({p, q, ImagePrompt(str(p), images[0])}) == 2
    r = pickle.loads(pickle.dumps(p))
    assert r == p and r.image == images[0] and copy.deepcopy(p) == p
    assert p.text == IMAGE_TOKEN + "\nThe capital of this country is"
    assert ImagePrompt("USER: <image>\nQ? ASSISTANT:", images[0]).text == "USER: <image>\nQ? ASSISTANT:"


def test_expanded_tokens_equal_the_processors(tiny_vlm, images):
    from PIL import Image

    proc = tiny_vlm.processor
    assert is_multimodal(tiny_vlm) and image_token_count(tiny_vlm) == 4
    p = ImagePrompt("The capital of France is", images[0])
    batch = encode(tiny_vlm, [p])
    ref = proc(text=[p.text], images=[Image.open(images[0]).convert("RGB")], return_tensors="pt")
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    assert torch.equal(batch.pixel_values, ref["pixel_values"])
    with torch.no_grad():
        want = torch.log_softmax(tiny_vlm.hf(**ref).logits[0, -1].float(), -1)
    got = last_token_logprobs(tiny_vlm, [p])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_image_matters_and_batching_with_text_rows_is_exact(tiny_vlm, images):
    a = ImagePrompt("The capital of France is", images[0])
    b = ImagePrompt("Paris is the capital of", images[1])
    c = "The capital of Japan is"  # text-only through the VLM
    together = last_token_logprobs(tiny_vlm, [a, c, b])
    alone = torch.cat([last_token_logprobs(tiny_vlm, [x]) for x in (a, c, b)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    other = last_token_logprobs(tiny_vlm, [a.with_text(str(a)).__class__(str(a), images[2])])[0]
    assert (other - alone[0]).abs().max() > 1e-4  # another image, another distribution


def test_answer_ids_and_teacher_forcing_with_images(tiny_vlm, images):
    p = ImagePrompt("The capital of France is", images[0])
    assert answer_ids(tiny_vlm.tokenizer, p, "Paris") == answer_ids(tiny_vlm.tokenizer, str(p), "Paris")
    ids = tokenize(tiny_vlm.tokenizer, p)
    assert sum(1 for t in ids if t < 0) == 1  # one placeholder before expansion
    lp = sequence_logprobs(tiny_vlm, [p, "The capital of France is"], ["Paris", "Paris"])
    assert lp[0].shape == lp[1].shape and not torch.allclose(lp[0], lp[1])


def test_generation_with_images_is_seeded(tiny_vlm, images):
    from attacks.blackbox import sample_continuations

    p = [ImagePrompt("The capital of France is", images[0]), "The capital of Japan is"]
    a = sample_continuations(tiny_vlm, p, samples=3, max_new_tokens=4, seed=7)
    b = sample_continuations(tiny_vlm, p, samples=3, max_new_tokens=4, seed=7)
    assert a == b and len(a) == 2 and all(len(r) == 3 for r in a)


def test_bad_image_input(tiny_vlm, tiny_llama, images, tmp_path):
    p = ImagePrompt("The capital of France is", images[0])
    with pytest.raises(InputError, match="text-only"):
        encode(tiny_llama, [p])
    with pytest.raises(InputError, match="no image"):
        encode(tiny_vlm, ["<image>\nThe capital of France is"])
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="broken.png.*readable"):
        encode(tiny_vlm, [ImagePrompt("x is", str(bad))])
    with pytest.raises(InputError, match="missing.png.*not found"):
        encode(tiny_vlm, [ImagePrompt("x is", str(tmp_path / "missing.png"))])
    with pytest.raises(InputError, match="one <image>"):
        encode(tiny_vlm, [ImagePrompt("<image> and <image>", images[0])])


def test_attach_images(tiny_vlm, tiny_llama, images):
    from probe.facts import Fact

    f = Fact(id="a", prompt="The capital of this country is", answer="Paris", paraphrases=["Its capital is"],
             neighborhood=[{"prompt": "Its language is", "answer": "French", "image": images[0]},
                           {"prompt": "The capital of Japan is", "answer": "Tokyo"}],
             image=images[0], source="facts.jsonl:3")
    t = Fact(id="b", prompt="The capital of Japan is", answer="Tokyo")
    g, h = attach_images(tiny_vlm, [f, t])
    assert isinstance(g.prompt, ImagePrompt) and g.prompt.image == images[0]
    assert all(isinstance(p, ImagePrompt) for p in g.paraphrases)
    assert isinstance(g.neighborhood[0]["prompt"], ImagePrompt)
    assert not isinstance(g.neighborhood[1]["prompt"], ImagePrompt)
    assert h is t  # text-only facts run text-only on a VLM
    assert attach_images(tiny_vlm, [g])[0].prompt == g.prompt  # idempotent
    with pytest.raises(InputError) as err:
        attach_images(tiny_llama, [t, f])
    assert err.value.file == "facts.jsonl" and err.value.line == 3 and err.value.field == "image"
    assert attach_images(tiny_llama, [t]) == [t]


def test_edit_on_vlm_moves_only_the_language_model(tiny_vlm, images):
    from defenses import make_objective
    from defenses.base import editor_for
    from probe.facts import Fact

    fact = attach_images(tiny_vlm, [Fact(id="a", prompt="The capital of France is", answer="Paris",
                                         image=images[0])])[0]
    before = sequence_logprobs(tiny_vlm, [fact.prompt], ["Paris"])[0].sum()
    vision = {k: v.clone() for k, v in tiny_vlm.hf.model.vision_tower.state_dict().items()}
    projector = {k: v.clone() for k, v in tiny_vlm.hf.model.multi_modal_projector.state_dict().items()}
    obj = make_objective("fact-erasure")
    editor = editor_for(obj, "constrained-ft", dict(layer=1, norm_bound=0.5, lr=0.05, steps=10, early_stop=None))
    session = editor.session(tiny_vlm)
    editor.edit(session, obj, obj.request(fact, [fact], []))
    edited = session.model
    after = sequence_logprobs(edited, [fact.prompt], ["Paris"])[0].sum()
    assert after < before - 0.1
    for k, v in edited.hf.model.vision_tower.state_dict().items():
        assert torch.equal(v, vision[k])
    for k, v in edited.hf.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, projector[k])
    session.restore()
    assert torch.equal(sequence_logprobs(session.model, [fact.prompt], ["Paris"])[0].sum(), before)


@pytest.fixture(scope="module")
def flag_facts(tmp_path_factory):
    """Built-in image facts for 4 countries x (capital, language), as loaded from disk."""
    from probe.facts import load_facts
    from probe.vlm.image_facts import write_builtin_image_facts

    path = write_builtin_image_facts(tmp_path_factory.mktemp("flags") / "set", countries=["France", "Japan", "Italy",
                                     "Egypt"], relations=("capital", "language"), n_per_strength=1,
                                     n_neighborhood_images=2)
    return load_facts(str(path))


def test_image_attacks_sets_budgets_and_skips(tiny_vlm, flag_facts, images):
    from attacks import AttackContext, make_attack
    from attacks.blackbox import paraphrase_images
    from probe.facts import Fact

    f = attach_images(tiny_vlm, flag_facts[:1])[0]
    paras = f.image_paraphrases
    assert paraphrase_images(f, "easy") == [f.image, paras["easy"][0]]
    assert paraphrase_images(f, "hard") == [f.image, paras["easy"][0], paras["medium"][0], paras["hard"][0]]
    assert paraphrase_images(f, "medium", cumulative=False) == [paras["medium"][0]]
    with pytest.raises(ValueError, match="easy, medium, hard"):
        make_attack("image-rephrase", strength="extreme")
    no_para = attach_images(tiny_vlm, [Fact(id="np", prompt="The capital of this country is", answer="Paris",
                                            image=images[0])])[0]
    text = Fact(id="t", prompt="The capital of France is", answer="Paris")
    ctx = AttackContext(facts=[f, no_para, text], seed=0)
    ir = make_attack("image-rephrase", max_new_tokens=2)
    mm = make_attack("multimodal-rephrase", max_new_tokens=2)
    assert ir.budget() == 4 * 5 and mm.budget() == 4 * 4 * 1
    out = ir.run(tiny_vlm, [f, no_para, text], ctx)
    assert out[0].skipped is None and out[0].budget == 20 and len(out[0].samples) == 20
    assert len(set(out[0].details["images"])) == 4 and out[0].details["images"][0] == f.image
    assert out[1].skipped == "no paraphrase images" and out[2].skipped == "no image"
    again = ir.run(tiny_vlm, [f], ctx)[0]
    assert again.samples == out[0].samples  # seeded per fact
    m = mm.run(tiny_vlm, [f], ctx)[0]
    assert m.budget == 16 and len(set(m.details["prompts"])) == 4  # 4 question rephrasings x 4 images
    # question rephrase and jailbreak keep the original image
    qr = make_attack("question-rephrase", max_new_tokens=2)
    assert all(isinstance(p, ImagePrompt) and p.image == f.image for p in qr.prompts(f))
    jb = make_attack("jailbreak", max_new_tokens=2)
    assert all(isinstance(p, ImagePrompt) and p.image == f.image for p in jb.prompts(f))


def test_run_and_grid_on_a_vlm(tiny_vlm, flag_facts, tmp_path):
    from probe.jobs import GridConfig, RunConfig, run_grid, run_main

    attacks = ["head-projection", "image-rephrase", "multimodal-rephrase"]
    cfg = RunConfig(attacks=attacks, known_rank=10**6, max_facts=2, progress=False, acc_tokens=2,
                    editor_config={"steps": 2}, attack_config={a: {"max_new_tokens": 2} for a in attacks[1:]})
    res = run_main(tiny_vlm, flag_facts, tmp_path / "run", cfg, facts_label="flags")
    assert res.n_facts == 2
    assert all(f.modal and f.modal.text_prompt.startswith("This is the flag of") for f in res.facts)
    assert all(len(f.modal.text_pre.rank) == tiny_vlm.n_layers and f.modal.text_post for f in res.facts)
    assert res.attacks["image-rephrase"].n_skipped == 0 and res.attacks["image-rephrase"].modality == "image-only"
    assert res.attacks["multimodal-rephrase"].budget == 16
    assert len(res.meta["image_examples"]) == 2
    # retention (output sweep) and generation scores run on image prompts too
    n_known = res.meta["known_filter"]["n_known"]
    # (the file's n_known - 1 other known facts are fewer than 50: topped up with built-in text facts)
    assert all(f.scores.retention_n == f.pools["retention"]["size"] > n_known - 1 and
               f.pools["retention"]["source"] == "file + built-in" and f.scores.generation_acc_pre in (0.0, 1.0)
               for f in res.facts)
    gcfg = GridConfig(defenses=["fact-erasure", "head-projection"], attacks=attacks, known_rank=10**6, max_facts=2,
                      random_n=2, acc_tokens=2, progress=False, editor_config={"steps": 2},
                      attack_config={a: {"max_new_tokens": 2} for a in attacks[1:]})
    grid = run_grid(tiny_vlm, flag_facts, tmp_path / "grid", gcfg, facts_label="flags").to_dict()
    cells = {(c["defense"], c["attack"]): c for c in grid["cells"]}
    assert cells[("fact-erasure", "image-rephrase")]["n_facts"] == 2
    assert cells[("head-projection", "multimodal-rephrase")]["budget"] == 16
    assert len(grid["per_layer_text"]["pre"]) == tiny_vlm.n_layers
    assert set(grid["per_layer_text"]["post"]) == {"fact-erasure", "head-projection"}
    assert grid["image_examples"][0]["image_paraphrases"]["hard"]


def test_image_facts_on_a_text_model_are_refused(tiny_llama, flag_facts, tmp_path):
    from probe.jobs import RunConfig, run_main

    with pytest.raises(InputError) as err:
        run_main(tiny_llama, flag_facts, tmp_path / "run", RunConfig(progress=False))
    assert err.value.field == "image" and err.value.line == 1 and err.value.file.endswith("facts.jsonl")
    assert not (tmp_path / "run").exists()  # nothing written


# ROME at the tiny model's scale (|v_init| ~ 0.02; as FAST_ROME in tests/unit/defenses/test_editors.py):
# GPT-J's v_lr 0.5 and weight decay |delta| / |v_init|^2 (total 0.003 -> 89.9) oscillate at the clamp
@pytest.mark.parametrize("editor_name,config", [("lora", dict(layer=1, lr=0.1, steps=5, early_stop=None)),
                                                ("rome", dict(layer=0, early_stop=None, v_steps=10, v_lr=0.02,
                                                              v_weight_decay=0.0, clamp_norm_factor=20))])
def test_lora_and_rome_edits_on_vlm(tiny_vlm, flag_facts, editor_name, config, tmp_path, monkeypatch):
    from defenses import make_objective
    from defenses.base import editor_for

    monkeypatch.setenv("PROBE_ATTACK_CACHE", str(tmp_path))
    fact = attach_images(tiny_vlm, flag_facts[:1])[0]
    if editor_name == "rome":  # ROME refuses a fact without subject; a tiny random model routes little
        # from earlier tokens, so key on the prompt's last token ("... this country is")
        fact = dataclasses.replace(fact, subject="country is")
    before = sequence_logprobs(tiny_vlm, [fact.prompt], [fact.answer])[0].sum()
    obj = make_objective("fact-erasure")
    editor = editor_for(obj, editor_name, config)
    session = editor.session(tiny_vlm)
    info = editor.edit(session, obj, obj.request(fact, flag_facts, []))
    assert info.max_abs_change > 0
    after = sequence_logprobs(session.model, [fact.prompt], [fact.answer])[0].sum()
    assert after < before - 0.05
    session.restore()


def test_llava_directory_loads_offline_with_its_processor(tiny_tokenizer, tmp_path, images):
    import probe
    from conftest import build_tiny_vlm
    from probe.errors import ModelLoadError

    hf, tok, proc = build_tiny_vlm(tiny_tokenizer)
    hf.save_pretrained(tmp_path / "llava")
    proc.save_pretrained(tmp_path / "llava")
    m = probe.load_model(str(tmp_path / "llava"))
    assert is_multimodal(m) and type(m.hf).__name__ == "LlavaForConditionalGeneration"
    assert image_token_count(m) == 4 and m.n_layers == 2
    p = ImagePrompt("The capital of France is", images[0])
    ref = probe.wrap_model(hf, tok, name="ref", processor=proc)
    torch.testing.assert_close(last_token_logprobs(m, [p]), last_token_logprobs(ref, [p]), rtol=0, atol=1e-5)
    # weights without their processor: a clear error, nothing downloaded
    hf.save_pretrained(tmp_path / "noproc")
    with pytest.raises(ModelLoadError, match="processor"):
        probe.load_model(str(tmp_path / "noproc"))


def test_relearning_and_probe_attacks_run_on_a_vlm(tiny_vlm, flag_facts):
    import dataclasses

    from attacks import AttackContext, make_attack
    from probe.probes import UNRANKED

    facts = attach_images(tiny_vlm, flag_facts)
    ctx = AttackContext(facts=facts, deleted=frozenset({facts[0].id}), seed=0)
    rel = make_attack("relearning", lr=1e-2).run(tiny_vlm, facts[:1], ctx)[0]
    n = tiny_vlm.n_layers
    assert rel.budget == make_attack("head-projection").budget(n)
    assert all(isinstance(p, ImagePrompt) for p in rel.details["relearn_data"])
    # relearning trains LoRA adapters on the language model's MLPs only, on image prompts (its loss
    # falls), but 10 epochs do not teach a random model the answer
    loss = rel.details["relearn_loss"]
    assert len(loss) == rel.details["relearn_steps"] == 10 and loss[-1] < 0.95 * loss[0]  # measured 5.72 -> 5.19
    assert rel.details["relearn_modules"] == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert rel.details["relearn_layers"] == list(range(n))  # the language model's decoder layers
    assert not rel.success and 4 < rel.best_rank <= len(tiny_vlm.tokenizer)
    # the probe reads the image prompts' hidden states: trained on two copies (other ids) of every
    # image fact of the relation, it ranks the deleted fact's answer first at both layers -- the
    # countries' capital prompts differ only by their image
    twins = [dataclasses.replace(f, id=f"{f.id}-{c}") for c in "ab" for f in facts]
    ctx2 = AttackContext(facts=facts + twins, deleted=frozenset({facts[0].id}), seed=0)
    lp = make_attack("linear-probe", max_train=None).run(tiny_vlm, facts[:1], ctx2)[0]
    rel_answers = {f.answer for f in facts if f.relation == facts[0].relation}
    assert lp.details["n_classes"] == len(rel_answers) and set(lp.details["candidates"]) <= rel_answers
    assert lp.details["ranks_at_L"] == [1, 1] and lp.best_rank == 1 and lp.success
    assert len(lp.layer_ranks) == n
    # without them every answer occurs once (min_examples = 2): the fact is skipped, not failed
    alone = make_attack("linear-probe", max_train=8).run(tiny_vlm, facts[:1], ctx)[0]
    assert alone.skipped == "answer has < 2 training examples" and alone.best_rank is None


def test_causal_traces_of_image_facts_use_the_text_form(tiny_vlm, flag_facts, tmp_path):
    import json

    from probe.causal import causal_trace
    from probe.jobs import RunConfig, run_main

    fact = attach_images(tiny_vlm, flag_facts[:1])[0]
    with pytest.raises(InputError, match="text form"):
        causal_trace(tiny_vlm, fact.prompt, fact.answer, subject_positions=[0])
    cfg = RunConfig(attacks=["head-projection"], known_rank=10**6, max_facts=1, progress=False, acc_tokens=2,
                    editor_config={"steps": 1}, causal_traces=1)
    run_main(tiny_vlm, flag_facts, tmp_path / "run", cfg)
    rec = json.loads((tmp_path / "run" / "causal_traces.jsonl").read_text().splitlines()[0])
    assert rec["corrupted"].startswith("entity 'France'") and rec["pre"]["probs"]


def test_rome_subject_position_in_an_image_prompt(tiny_vlm, images):
    from defenses.rome import last_token_index, subject_span
    from probe.images import expanded_position

    tok = tiny_vlm.tokenizer
    p = ImagePrompt("The Eiffel Tower is located in the city of", images[0])
    span = subject_span(p, "Eiffel Tower")
    i = last_token_index(tok, p, span)
    ids = tokenize(tok, p)
    assert ids[0] < 0  # the image placeholder comes first
    full = tok("<image>\nThe Eiffel Tower", add_special_tokens=True)["input_ids"]
    assert i == len(full) - 1  # the subject's last token, counted with the image as one token
    j = expanded_position(tiny_vlm, ids, i)
    batch = encode(tiny_vlm, [p])
    assert j == i + image_token_count(tiny_vlm) - 1
    assert batch.input_ids[0, j].item() == ids[i]  # the same token in the expanded row


def test_accuracy_metrics_generate_with_the_image(tiny_vlm, images):
    """Regression: greedy generation for the accuracy metrics (random / neighbourhood Δ-Acc) must
    pass the image; without pixel_values LLaVA silently embeds the image tokens as the zero row."""
    from attacks.blackbox import sample_continuations
    from defenses.metrics import generation_accuracy, greedy_continuations

    ps = [ImagePrompt("The capital of France is", images[0]), ImagePrompt("Paris is the capital of", images[1]),
          "The capital of Japan is"]
    got = greedy_continuations(tiny_vlm, ps, max_new_tokens=4)
    want = [r[0] for r in sample_continuations(tiny_vlm, ps, samples=1, max_new_tokens=4, do_sample=False)]
    assert got == want
    alone = [greedy_continuations(tiny_vlm, [p], max_new_tokens=4)[0] for p in ps]
    assert got == alone
    labels = [g.split()[0] if g.split() else "zzz" for g in got]
    assert generation_accuracy(tiny_vlm, ps, labels, max_new_tokens=4) == [bool(g.split()) for g in got]


def test_image_prompts_sort_by_text_then_image(images):
    """Regression: prompts with equal text and other images must sort deterministically (retain
    prompts are drawn from sorted sets; text-only ordering left them to hash randomisation)."""
    a, b, c = (ImagePrompt("The capital of this country is", im) for im in images)
    t = "The capital of this country is"
    assert sorted({c, a, b, t}) == [t, a, b, c]  # images[] paths are in order img0 < img1 < img2
    assert sorted([b, "A", c, a]) == ["A", a, b, c]
    assert a < b and not b < a and a <= a and c > b >= b and t < a


def test_image_rephrase_falls_back_when_strengths_are_missing(tiny_vlm, images):
    from attacks.blackbox import paraphrase_images
    from probe.facts import Fact

    f = Fact(id="x", prompt="The capital of this country is", answer="Paris", image=images[0],
             image_paraphrases={"hard": [images[2]]})
    assert paraphrase_images(f, "easy") == [images[0], images[2]]
    assert paraphrase_images(f, "hard") == [images[0], images[2], images[2], images[2]]  # budget stays 4 x 5
    assert paraphrase_images(f, "medium", cumulative=False) == [images[2]]
