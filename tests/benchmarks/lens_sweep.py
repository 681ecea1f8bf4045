"""Benchmark: our layer-wise lens sweep vs its floor, TransformerLens and a naive loop, all doing the same work.

Run from the repository root (not collected by pytest)::

    .venv/bin/python tests/benchmarks/lens_sweep.py [--n 300] [--model smollm2-135m] [--memory-check]
    .venv/bin/python tests/benchmarks/lens_sweep.py --model mini-vlm    # the VLM case (image prompts)

**The job** every contender does, on the same CounterFact facts
(``../shared/data/counterfact_filtered.json``), the same batches: the residual stream of *every*
layer at the last prompt token, decoded by the logit lens (final norm + unembedding, fp32); the
answer's 1-based rank at every layer; and the best ranks of the head-projection, probability-delta
and PD² attacks (default layers and k). Scoring is the same code for the batched contenders
(:class:`probe.readout.LensBatch` and each attack's ``scorers``), so what differs is how the
residuals are obtained:

ours_s
    ``attacks.attack_readout(model, prompts, answers, [HP, PD, PD²], teacher_force=False)``: one
    nnsight trace per batch over the prompt, one stacked unembedding matmul, the scoring.
floor_s
    The physical floor: a plain batched HF forward (``model.hf`` called directly, outside any trace;
    left-padded batches from ``probe.encode`` with mask-derived ``position_ids``;
    ``output_hidden_states=True``; ``logits_to_keep=1``), the final norm on ``hidden_states[1:-1]``
    (HF's last hidden state is already normed, transformers PR #40994), ONE stacked unembedding
    matmul, then the same scoring.
transformer_lens_s
    TransformerLens 4.3 ``TransformerBridge.run_with_cache`` per batch (token ids, left-padded, with
    ``attention_mask`` and ``position_ids``), ``names_filter`` restricted to
    ``blocks.*.hook_resid_post``, stacked resid_post at the last token -> ``ln_final`` ->
    ``unembed``, then the same scoring. The bridge wraps its own clean copy of the weights.
naive_loop_s
    Per fact, per layer, in the style of the papers' reference code: one unbatched HF forward with
    ``output_hidden_states``; for each layer norm + lm_head + softmax + rank separately, then the
    attacks' top-k / PD / PD² candidate sets. Measured on ``--naive-n`` facts (default 60) and
    extrapolated linearly to n (the output says so).
teacher_forcing_s
    Timed separately: ours with teacher forcing (``prompt + answer[:-1]``, the full-answer
    log-probs every job also records) minus ours without.

Each is warmed up once before timing; each batched contender's per-layer ranks are checked against
ours on the first batch (untimed). ``peak_rss_mb`` is the process' peak RSS (``VmHWM``, else
``ru_maxrss``) right after our sweep, which runs first after loading the model. ``--memory-check``
additionally runs our sweep (with teacher forcing) over all facts of the file (1,400) in a fresh
subprocess and compares its peak RSS with the model's parameter bytes (target: <= parameters + 1 GB).

Targets (issue 13): ours <= 1.15x the floor, TransformerLens >= 1.2x ours, the naive loop >= 10x
ours. The last line printed is one JSON object with ``ours_s``, ``floor_s``, ``transformer_lens_s``,
``naive_loop_s``, ``teacher_forcing_s``, ``peak_rss_mb`` and extras.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "counterfact_filtered.json"
sys.path.insert(0, str(ROOT))

os.environ["PIP_NO_INDEX"] = "1"  # TransformerLens must never install anything
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import probe  # noqa: E402
from attacks import attack_readout, make_attack  # noqa: E402
from probe.facts import load_counterfact  # noqa: E402
from probe.vlm.image_facts import load_builtin_image_facts  # noqa: E402
from probe.images import attach_images, is_multimodal  # noqa: E402
from probe.readout import LensBatch, auto_batch_size  # noqa: E402

ATTACK_NAMES = ("head-projection", "probability-delta", "pd2")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB).

    ``VmHWM`` from /proc/self/status where available: unlike ``ru_maxrss`` it is not inherited
    across fork + exec, so the --memory-check subprocess measures only itself. Elsewhere
    ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in list(model.hf.parameters()) + list(model.hf.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# the four methods


def run_ours(model, prompts, answers, attacks, batch_size, teacher_force=False):
    return attack_readout(model, prompts, answers, attacks, batch_size=batch_size, teacher_force=teacher_force)


def score(model, logits, first, attacks):
    """The job's scoring, as ours does it: per-layer answer ranks ``[B, L]`` and each attack
    scorer's best rank (the same :class:`LensBatch` and scorer code)."""
    batch = LensBatch(logits, first.to(logits.device))
    scorers = {name: fn for a in attacks for name, fn in a.scorers(model.n_layers).items()}
    extra = {name: fn(batch) for name, fn in scorers.items()}
    return batch.ranks, extra


def _final_norm_unembed(model):
    return model.final_norm, model.unembed


def _first_ids(model, prompts, answers) -> torch.Tensor:
    return torch.tensor([probe.answer_ids(model.tokenizer, p, a)[0] for p, a in zip(prompts, answers)])


@torch.no_grad()
def run_floor(model, prompts, answers, attacks, batch_size):
    """Plain HF forward + one stacked unembedding matmul + the same scoring; per-layer answer
    ranks ``[n, L]``."""
    norm, unembed = _final_norm_unembed(model)
    ranks = []
    for s in range(0, len(prompts), batch_size):
        batch = probe.encode(model, prompts[s:s + batch_size])
        out = model.hf(**batch.model_inputs(), output_hidden_states=True, logits_to_keep=1, use_cache=False)
        hs = out.hidden_states
        pre = torch.stack([h[:, -1] for h in hs[1:-1]], 1)          # [B, L-1, d], pre-norm
        resid = torch.cat([norm(pre), hs[-1][:, -1:]], 1).float()    # last one is already normed
        logits = unembed(resid)                                      # [B, L, V]: one matmul
        r, _ = score(model, logits, _first_ids(model, prompts[s:s + batch_size], answers[s:s + batch_size]), attacks)
        ranks.append(r)
    return torch.cat(ranks)


def clean_hf_copy(model):
    """A fresh HF model with copies of ``model``'s weights, without nnsight's patched forwards."""
    from transformers.initialization import no_init_weights

    hf = model.hf
    with no_init_weights():
        twin = type(hf)(copy.deepcopy(hf.config))
    twin.load_state_dict({k: v.detach().clone() for k, v in hf.state_dict().items()}, strict=False)
    twin.tie_weights()
    return twin.to(model.device).eval()


def boot_bridge(model):
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: PLC0415

    conftest.block_transformer_lens_installs()
    from transformer_lens import TransformerBridge  # noqa: PLC0415

    name = getattr(model.hf.config, "_name_or_path", "") or model.name
    if model.name in ("smollm2-135m", "smollm2", "default") or "SmolLM2" in name:
        name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    return TransformerBridge.boot_transformers(name, hf_model=clean_hf_copy(model),
                                               tokenizer=copy.deepcopy(model.tokenizer),
                                               dtype=model.dtype, device=str(model.device))


@torch.no_grad()
def run_transformer_lens(bridge, model, prompts, answers, attacks, batch_size):
    n = model.n_layers
    names = {f"blocks.{i}.hook_resid_post" for i in range(n)}
    ranks = []
    for s in range(0, len(prompts), batch_size):
        batch = probe.encode(model, prompts[s:s + batch_size])
        _, cache = bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask,
                                         position_ids=batch.position_ids, names_filter=lambda k: k in names)
        resid = torch.stack([cache[f"blocks.{i}.hook_resid_post"][:, -1] for i in range(n)], 1)  # [B, L, d]
        logits = bridge.unembed(bridge.ln_final(resid)).float()                                  # [B, L, V]
        r, _ = score(model, logits, _first_ids(model, prompts[s:s + batch_size], answers[s:s + batch_size]), attacks)
        ranks.append(r)
    return torch.cat(ranks)


@torch.no_grad()
def run_naive(model, prompts, answers, attacks):
    """Per fact, per layer: norm + lm_head + softmax + top-k separately (reference-code style)."""
    norm, unembed = _final_norm_unembed(model)
    n = model.n_layers
    hp, pd, pd2 = attacks
    hp_l, pd_l, pd2_l = (a.resolve_layers(n) for a in attacks)
    ranks = []
    for p, a in zip(prompts, answers):
        one = probe.encode(model, [p])  # image prompts: image tokens expanded, pixel_values attached
        target = probe.answer_ids(model.tokenizer, p, a)[0]
        extra = {} if one.pixel_values is None else {"pixel_values": one.pixel_values}
        hs = model.hf(input_ids=one.input_ids, output_hidden_states=True, use_cache=False, **extra).hidden_states
        probs, fact_ranks, cands = [], [], []
        for layer in range(n):
            h = hs[layer + 1][0, -1]
            h = h if layer == n - 1 else norm(h)
            pr = torch.softmax(unembed(h).float(), -1)
            probs.append(pr)
            fact_ranks.append(int((pr > pr[target]).sum()) + 1)
            if layer in hp_l:
                cands.append(torch.topk(pr, hp.k).indices)
        for x, y in zip(pd_l, pd_l[1:]):
            d = probs[y] - probs[x]
            cands += [torch.topk(d, pd.k).indices, torch.topk(-d, pd.k).indices]
        for x, y, z in zip(pd2_l, pd2_l[1:], pd2_l[2:]):
            d = probs[z] - 2 * probs[y] + probs[x]
            cands += [torch.topk(d, pd2.k).indices, torch.topk(-d, pd2.k).indices]
        _ = any(bool((c == target).any()) for c in cands)
        ranks.append(fact_ranks)
    return torch.tensor(ranks)


# ---------------------------------------------------------------------------------------------


def agreement(ranks: torch.Tensor, ours_rank: torch.Tensor) -> float:
    """Fraction of (fact, layer) answer ranks equal to ours (first rows of ours); rounding
    differences (sdpa vs eager attention, batched vs unbatched) can move near-tied ranks."""
    return round(float((ranks == ours_rank[:len(ranks)]).float().mean()), 4)


def load_facts(path: Path, n: int | None, model=None):
    if model is not None and is_multimodal(model):
        # the VLM case: the built-in flag image facts (image prompts; 4 image tokens each on the
        # mini VLM), cycled to n; only the answer position is decoded, never the image positions
        facts = attach_images(model, load_builtin_image_facts())
        if n is not None:
            facts = [facts[i % len(facts)] for i in range(n)]
        return [f.prompt for f in facts], [f.answer for f in facts]
    facts = load_counterfact(path)
    if n is not None:
        if len(facts) < n:
            print(f"warning: {path} has only {len(facts)} facts (asked for {n})", file=sys.stderr)
        facts = facts[:n]
    return [f.prompt for f in facts], [f.answer for f in facts]


def memory_only(args) -> dict:
    """Child process of --memory-check: our sweep over every fact of the file; peak RSS."""
    model = probe.load_model(args.model)
    rss_loaded = peak_rss_mb()
    prompts, answers = load_facts(args.data, None, model)
    attacks = [make_attack(a) for a in ATTACK_NAMES]
    bs = args.batch_size or auto_batch_size(model.n_layers, model.vocab_size)
    t = timed(lambda: run_ours(model, prompts, answers, attacks, bs, teacher_force=True))
    pb = param_bytes(model)
    peak = peak_rss_mb()
    target = pb / 2**20 + 1024
    return {"n": len(prompts), "seconds": round(t, 3), "peak_rss_mb": round(peak, 1),
            "rss_after_load_mb": round(rss_loaded, 1), "param_mb": round(pb / 2**20, 1),
            "target_mb": round(target, 1), "ok": peak <= target}


def memory_check(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-only", "--model", args.model,
           "--data", str(args.data)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"memory check failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="facts to time (default 300)")
    ap.add_argument("--model", default="smollm2-135m",
                    help="smollm2-135m (CounterFact facts) or mini-vlm / a LLaVA directory (the VLM case: the "
                         "built-in flag image facts with their images)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batch-size", type=int, default=None, help="default: ours' auto batch size")
    ap.add_argument("--naive-n", type=int, default=60, help="facts for the naive loop (extrapolated to n)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--memory-check", action="store_true",
                    help="also run our sweep over all facts in a fresh process and check its peak RSS")
    ap.add_argument("--skip-transformer-lens", action="store_true")
    ap.add_argument("--_memory-only", dest="memory_only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(memory_only(args)))
        return

    t0 = time.perf_counter()
    model = probe.load_model(args.model)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    prompts, answers = load_facts(args.data, args.n, model)
    n = len(prompts)
    if is_multimodal(model) and not args.skip_transformer_lens:
        print("multimodal model: TransformerLens is skipped (its bridge would need torchvision)", flush=True)
        args.skip_transformer_lens = True
    attacks = [make_attack(a) for a in ATTACK_NAMES]
    bs = args.batch_size or auto_batch_size(model.n_layers, model.vocab_size)
    print(f"model {model.name}: {model.n_layers} layers, vocab {model.vocab_size}, {param_bytes(model) / 2**20:.0f} MiB "
          f"params; {n} facts, batch {bs}, {torch.get_num_threads()} threads; loaded in {load_s:.1f}s", flush=True)

    # (a) ours -- first, so peak RSS reflects only the model + our sweep
    run_ours(model, prompts[:bs], answers[:bs], attacks, bs)
    out_ours = []
    ours_s = timed(lambda: out_ours.extend(run_ours(model, prompts, answers, attacks, bs)))
    rss = peak_rss_mb()
    ours_rank = torch.tensor([r.rank for r in out_ours])
    print(f"ours            {ours_s:8.2f}s", flush=True)
    run_ours(model, prompts[:bs], answers[:bs], attacks, bs, teacher_force=True)
    ours_tf_s = timed(lambda: run_ours(model, prompts, answers, attacks, bs, teacher_force=True))
    tf_s = ours_tf_s - ours_s
    print(f"ours + teacher forcing {ours_tf_s:8.2f}s  (teacher forcing {tf_s:.2f}s)", flush=True)

    # (b) the floor; its warm-up on the first batch doubles as the (untimed) check against ours
    floor_agree = agreement(run_floor(model, prompts[:bs], answers[:bs], attacks, bs), ours_rank)
    floor_s = timed(lambda: run_floor(model, prompts, answers, attacks, bs))
    print(f"floor           {floor_s:8.2f}s  (first batch's per-layer answer ranks equal to ours: {floor_agree:.2%})",
          flush=True)

    # (c) TransformerLens
    tl_s, tl_agree = None, None
    if not args.skip_transformer_lens:
        bridge = boot_bridge(model)
        tl_agree = agreement(run_transformer_lens(bridge, model, prompts[:bs], answers[:bs], attacks, bs), ours_rank)
        tl_s = timed(lambda: run_transformer_lens(bridge, model, prompts, answers, attacks, bs))
        del bridge
        print(f"TransformerLens {tl_s:8.2f}s  (first batch's per-layer answer ranks equal to ours: {tl_agree:.2%})", flush=True)

    # (d) naive loop, on a subset, extrapolated
    m = min(n, args.naive_n)
    run_naive(model, prompts[:3], answers[:3], attacks)
    nv = []
    naive_sub = timed(lambda: nv.append(run_naive(model, prompts[:m], answers[:m], attacks)))
    naive_s = naive_sub * n / m
    nv_agree = agreement(nv[0], ours_rank)
    note = f"measured on {m} facts ({naive_sub:.2f}s), extrapolated linearly to {n}" if m < n else f"all {n} facts"
    print(f"naive loop      {naive_s:8.2f}s  ({note}; ranks equal to ours: {nv_agree:.2%})", flush=True)

    mem = memory_check(args) if args.memory_check else None

    ratios = {"ours_over_floor": ours_s / floor_s,
              "transformer_lens_over_ours": (tl_s / ours_s) if tl_s else None,
              "naive_over_ours": naive_s / ours_s}
    targets = {"ours_over_floor": ("<=", 1.15), "transformer_lens_over_ours": (">=", 1.2),
               "naive_over_ours": (">=", 10.0)}
    print()
    print(f"{'ratio':<28}{'value':>8}  target  met")
    for k, v in ratios.items():
        op, tgt = targets[k]
        met = "n/a" if v is None else ("yes" if (v <= tgt if op == "<=" else v >= tgt) else "NO")
        print(f"{k:<28}{'-' if v is None else f'{v:8.2f}':>8}  {op} {tgt:<4} {met}")
    print(f"peak RSS after our sweep: {rss:.0f} MiB (after model load: {rss_loaded:.0f} MiB)")
    if mem:
        print(f"memory check ({mem['n']} facts, fresh process): peak RSS {mem['peak_rss_mb']:.0f} MiB vs params "
              f"{mem['param_mb']:.0f} MiB + 1024 = {mem['target_mb']:.0f} MiB -> {'ok' if mem['ok'] else 'OVER'}")
    result = {"ours_s": round(ours_s, 3), "floor_s": round(floor_s, 3),
              "transformer_lens_s": None if tl_s is None else round(tl_s, 3), "naive_loop_s": round(naive_s, 3),
              "teacher_forcing_s": round(tf_s, 3), "ours_with_teacher_forcing_s": round(ours_tf_s, 3),
              "peak_rss_mb": round(rss, 1), "n": n, "batch_size": bs, "threads": torch.get_num_threads(),
              "model": model.name, "naive_measured_n": m, "naive_extrapolated": m < n,
              "ratios": {k: (None if v is None else round(v, 3)) for k, v in ratios.items()},
              "rank_agreement": {"floor": floor_agree, "transformer_lens": tl_agree, "naive": nv_agree},
              "rss_after_load_mb": round(rss_loaded, 1), "param_mb": round(param_bytes(model) / 2**20, 1)}
    if mem:
        result["memory_check"] = mem
    print(json.dumps(result))


if __name__ == "__main__":
    main()
