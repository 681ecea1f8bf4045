"""Benchmark: causal tracing (ROME, section 2.1) -- ours, today's full-forward algorithm, and a plain-HF floor.

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/causal_trace.py [--model smollm2-135m] [--samples 10]

**The job**: the full causal-tracing map of "The Eiffel Tower is located in the city of" -> "Paris"
(subject "The Eiffel Tower"; every layer x every token; ROME's 10 noise samples at 3x the subject
embedding std), i.e. ``n_layers x T x samples`` corrupted-with-restoration forwards, plus the clean
and corrupted runs.

trace_s
    ``probe.causal.causal_trace`` as shipped: one corrupted run per noise sample keeps its
    key/value cache and the residual stream at the band boundaries; a restoration at (layer l,
    position i) then runs only positions ``i..T-1`` on that cache (earlier positions are the
    corrupted run's at every layer: causal attention) and skips (nnsight ``skip``) the layers below
    its band of ``ceil(n_layers / 6)`` layers (they are the corrupted run's at every position).
trace_before_s
    The same function with both short cuts turned off (``LAYER_BANDS = 1``, no cache): every row a
    full forward over all T tokens and all layers -- the algorithm before issue 13. Its map must
    equal ours (``max_abs_diff``).
trace_floor_s
    The physical floor of our work: the same groups, rows, token counts and layer counts run as plain
    Hugging Face forwards outside nnsight (the model's decoder-layer list sliced to the band,
    ``inputs_embeds`` = the corrupted states entering the band, ``cache`` = the corrupted run's
    cache cropped to the group's first position, restorations by ``register_forward_hook``), plus
    the same clean and corrupted runs. Llama-style models only (``model.model.layers``).

Target (issue 13): ours >= 2x faster than before (``trace_before_s / trace_s``); printed next to the
floor (``trace_s / trace_floor_s``). Each contender is warmed up once on a short prompt. The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

PROMPT, ANSWER, SUBJECT = "The Eiffel Tower is located in the city of", "Paris", "The Eiffel Tower"
WARM = ("The capital of Japan is", "Tokyo", "Japan")


def floor_trace(model, prompt, answer, subject, samples, noise_std, seed) -> torch.Tensor:
    """The plain-HF floor: ``[n_layers, T]`` restored probabilities, doing our groups' work."""
    from torch import nn

    import probe.causal as causal
    from probe.tokens import answer_ids, tokenize

    hf, tok = model.hf, model.tokenizer
    ids = tokenize(tok, prompt)
    T, L = len(ids), model.n_layers
    corrupt = causal.subject_token_positions(tok, prompt, subject)
    a = answer_ids(tok, prompt, answer)[0]
    layers = hf.model.layers
    x = torch.tensor([ids])
    clean: list = []  # every layer's output in the clean run ([1, T, d] each; HF's last hidden state is normed)
    grab = [layer.register_forward_hook(lambda mod, args, output: clean.append(output)) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            hf(input_ids=x, use_cache=False, logits_to_keep=1)
    finally:
        for h in grab:
            h.remove()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(samples, len(corrupt), model.d_model, generator=gen) * noise_std
    emb = hf.model.embed_tokens(x.expand(samples, T)).clone()
    emb[:, corrupt] += noise
    with torch.no_grad():  # the corrupted run, with its cache and every layer's states
        out = hf(inputs_embeds=emb, use_cache=True, output_hidden_states=True, logits_to_keep=1)
    cache, hidden = out.cache, out.hidden_states
    width = -(-L // causal.LAYER_BANDS)
    corrupted = torch.softmax(out.logits[:, -1].float(), -1)[:, a].mean()
    probs = torch.full((L, T), float(corrupted))  # the no-op cells ours does not run either
    for start in range(min(corrupt), T):
        for band in range(0, L, width):
            rows = [(layer, s) for layer in range(band, min(band + width, L)) for s in range(samples)
                    if layer < L - 1 or start == T - 1]
            if not rows:
                continue
            B, sidx = len(rows), torch.tensor([s for _, s in rows])
            if band == 0:
                inp = emb[sidx, start:]
            else:
                inp = hidden[band][sidx, start:]  # output of layer band-1 = input of the band
            past = None
            if start > 0:
                past = copy.deepcopy(cache)
                past.crop(start - T)
                past.reorder_cache(sidx)
            hooks = []
            for layer in range(band, min(band + width, L)):
                bs = torch.tensor([b for b, (lay, _) in enumerate(rows) if lay == layer], dtype=torch.long)

                def hook(mod, args, output, layer=layer, bs=bs):
                    output = output.clone()
                    output[bs, 0] = clean[layer][0, start]
                    return output
                hooks.append(layers[layer].register_forward_hook(hook))
            hf.model.layers = nn.ModuleList(list(layers)[band:])
            try:
                with torch.no_grad():
                    logits = hf(inputs_embeds=inp, position_ids=torch.arange(start, T)[None].expand(B, -1),
                                attention_mask=torch.ones(B, T, dtype=torch.long), cache=past,
                                use_cache=past is not None, logits_to_keep=1).logits[:, -1]
            finally:
                hf.model.layers = layers
                for h in hooks:
                    h.remove()
            p = torch.softmax(logits.float(), -1)[:, a].view(-1, samples).mean(1)
            probs[band:band + len(p), start] = p
    return probs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=10)
    args = ap.parse_args()

    import probe
    import probe.causal as causal

    model = probe.load_model(args.model)
    std = causal.subject_embedding_std(model, [SUBJECT])
    kw = {"subject": SUBJECT, "samples": args.samples, "embedding_std": std, "seed": 0}
    out: dict = {"model": args.model, "samples": args.samples, "n_layers": model.n_layers,
                 "layer_bands": causal.LAYER_BANDS}

    def ours(prompt, answer, subject):
        return causal.causal_trace(model, prompt, answer, **{**kw, "subject": subject})

    ours(*WARM)
    t = time.perf_counter()
    tr = ours(PROMPT, ANSWER, SUBJECT)
    out["trace_s"] = round(time.perf_counter() - t, 2)
    out["T"] = len(tr.tokens)
    print("ours", out["trace_s"], flush=True)

    bands, cache_kwarg = causal.LAYER_BANDS, causal._cache_kwarg
    causal.LAYER_BANDS, causal._cache_kwarg = 1, lambda m: None
    try:
        ours(*WARM)
        t = time.perf_counter()
        before = ours(PROMPT, ANSWER, SUBJECT)
        out["trace_before_s"] = round(time.perf_counter() - t, 2)
    finally:
        causal.LAYER_BANDS, causal._cache_kwarg = bands, cache_kwarg
    out["max_abs_diff_before"] = float((before.probs - tr.probs).abs().max())
    print("before", out["trace_before_s"], flush=True)

    if hasattr(model.hf, "model") and hasattr(model.hf.model, "layers"):
        floor_trace(model, *WARM, args.samples, tr.noise_std, 0)
        t = time.perf_counter()
        fl = floor_trace(model, PROMPT, ANSWER, SUBJECT, args.samples, tr.noise_std, tr.seed)
        out["trace_floor_s"] = round(time.perf_counter() - t, 2)
        out["max_abs_diff_floor"] = float((fl - tr.probs).abs().max())
        out["ours_over_floor"] = round(out["trace_s"] / out["trace_floor_s"], 2)
    out["speedup_vs_before"] = round(out["trace_before_s"] / out["trace_s"], 2)
    out["target_speedup_met"] = out["speedup_vs_before"] >= 2.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
