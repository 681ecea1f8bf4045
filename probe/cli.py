"""The ``probe-attack`` command line.

    probe-attack run    [--model M] [--facts F] [--defense fact-erasure] [--attacks ...] [--out DIR]
    probe-attack attack [--model M] [--facts F] [--attacks ...] [--out DIR]
    probe-attack models

Bad input gets one line on stderr naming the file, line and field, exit status 2, no traceback,
and nothing written. Ctrl-C keeps every finished fact; ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_INPUT = 2
BUILTIN_DEFAULT_MAX = 30
EXIT_INTERRUPTED = 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="embedded default (smollm2-135m) if omitted; also gemma-3-270m, a .gguf file, a local "
                        "Hugging Face directory, or a Hugging Face id already in the local cache")
    p.add_argument("--facts", default=None, help="facts file (JSONL, or CounterFact JSON); built-in set if omitted")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "counterfact"], help="facts file format")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/<date-time>; an existing run is never overwritten)")
    p.add_argument("--attacks", default="head-projection,probability-delta,pd2",
                   help="comma-separated whitebox attacks (head-projection, probability-delta, pd2)")
    p.add_argument("--max-facts", type=int, default=None,
                   help="use at most N facts, evenly spaced over the (known) facts; default: all facts of a "
                        f"--facts file, {BUILTIN_DEFAULT_MAX} of the built-in set (so the default job takes a few "
                        "minutes on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: auto)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default=None, help="weights dtype: float32 (default), bfloat16, float16; lens "
                                                 "and loss arithmetic always run in fp32")
    p.add_argument("--seed", type=int, default=0, help="random seed (retain-set sampling, torch)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probe-attack",
        description="Is deleted knowledge really gone? Delete facts from a language model and try to read "
                    "them back out of its residual stream, layer by layer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="the main job: filter known facts, attack, delete, attack again, report",
                         description="Filter known facts, run whitebox attacks, delete each fact with a defense, "
                                     "attack again and measure the deletion; writes results.json, per_fact.jsonl "
                                     "and report.html in --out.")
    _common(run)
    run.add_argument("--defense", default="fact-erasure", help="deletion objective (default fact-erasure)")
    run.add_argument("--editor", default="constrained-ft", help="editor (default constrained-ft)")
    run.add_argument("--protocol", default="one-at-a-time", choices=["one-at-a-time", "all-at-once"],
                     help="delete each fact from a fresh copy (papers' protocol) or all facts in one edit")
    run.add_argument("--known-rank", type=int, default=1,
                     help="keep facts whose answer's first token has rank <= N before deletion (default 1)")
    run.add_argument("--edit-layer", type=int, default=None, help="decoder layer whose MLP is edited")
    run.add_argument("--steps", type=int, default=None, help="optimisation steps per edit")
    run.add_argument("--lr", type=float, default=None, help="learning rate of the edit")
    run.add_argument("--norm-bound", type=float, default=None, help="element-wise bound |W - W0| of the edit")
    run.add_argument("--retain-weight", type=float, default=None, help="weight of the KL retain loss")
    run.add_argument("--retain-size", type=int, default=4,
                     help="retain prompts per edit: other facts' prompts most similar to the deleted one (default 4)")
    run.add_argument("--acc-tokens", type=int, default=8,
                     help="greedy tokens generated for neighborhood accuracy (paper: 36)")
    att = sub.add_parser("attack", help="attacks only (no filter, no deletion) on every fact, e.g. of a model "
                                        "you already edited",
                         description="Run the whitebox attacks on every given fact, without filtering or "
                                     "deletion; writes results.json, per_fact.jsonl and report.html in --out.")
    _common(att)
    sub.add_parser("models", help="list model short names and supported architectures")
    return parser


def _fail(msg: str, code: int = EXIT_INPUT) -> int:
    print(f"probe-attack: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import ProbeAttackError

    if args.command == "models":
        from .arch import supported_model_types
        from .model import SHORT_NAMES

        for k, v in SHORT_NAMES.items():
            print(f"{k:16s} {v}")
        print("architectures: " + ", ".join(supported_model_types()))
        return 0
    from .interrupt import graceful_interrupts

    try:
        with graceful_interrupts():
            return _run(args)
    except ProbeAttackError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # unknown attack/defense/editor names, bad layer indices
        return _fail(str(exc))
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or "the output folder"
        print(f"\nprobe-attack: interrupted; finished facts are saved in {out}/per_fact.jsonl -- "
              f"rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args) -> int:
    import torch

    from .facts import load_facts
    from .model import load_model
    from .pipeline import RunConfig, run_attack, run_main

    if args.out is None:
        if args.resume:
            return _fail("--resume needs the --out folder of the run to continue")
        import time

        args.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if args.max_facts is not None and args.max_facts < 1:
        return _fail("--max-facts must be >= 1")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks:
        return _fail("--attacks is empty")
    from attacks import WHITEBOX_ATTACKS

    unknown = [a for a in attacks if a not in WHITEBOX_ATTACKS]
    if unknown:
        return _fail(f"unknown attack {unknown[0]!r}; valid attacks: {', '.join(WHITEBOX_ATTACKS)}")
    editor_config = {}
    if args.command == "run":
        from defenses import EDITORS, OBJECTIVES

        if args.defense not in OBJECTIVES:
            return _fail(f"unknown defense {args.defense!r}; valid defenses: {', '.join(OBJECTIVES)}")
        if args.editor not in EDITORS:
            return _fail(f"unknown editor {args.editor!r}; valid editors: {', '.join(EDITORS)}")
        editor_config = {k: v for k, v in {"layer": args.edit_layer, "steps": args.steps, "lr": args.lr,
                                           "norm_bound": args.norm_bound,
                                           "retain_weight": args.retain_weight}.items() if v is not None}
    torch.manual_seed(args.seed)
    facts = load_facts(args.facts, args.format)  # validates before anything is written
    facts_label = str(Path(args.facts).resolve()) if args.facts else "built-in"
    progress = not args.quiet
    if progress:
        print(f"loading model {args.model or 'smollm2-135m (embedded default)'} ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    max_facts = args.max_facts
    if max_facts is None and args.facts is None and args.command == "run":
        max_facts = BUILTIN_DEFAULT_MAX
        if progress:
            print(f"using {max_facts} of the {len(facts)} built-in facts (evenly spaced); --max-facts N for more",
                  file=sys.stderr)
    cfg = RunConfig(attacks=attacks, max_facts=max_facts, batch_size=args.batch_size, seed=args.seed,
                    progress=progress)
    if args.command == "run":
        cfg.defense, cfg.editor, cfg.editor_config = args.defense, args.editor, editor_config
        cfg.protocol, cfg.known_rank = args.protocol, args.known_rank
        cfg.retain_size, cfg.acc_tokens = args.retain_size, args.acc_tokens
        result = run_main(model, facts, args.out, cfg, facts_label=facts_label, resume=args.resume)
    else:
        result = run_attack(model, facts, args.out, cfg, facts_label=facts_label, resume=args.resume)
    print(format_table(result))
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def format_table(result) -> str:
    """Plain-text results table (attack success@B in %, defense scores)."""
    lines = [f"model {result.model}: {result.n_facts} facts", "",
             f"{'attack':20s} {'layers':28s} {'B':>4s} {'success pre':>12s} {'success post':>13s}"]
    for name, a in result.attacks.items():
        post = "" if a.success_post is None else f"{100 * a.success_post:11.1f}%"
        layers = ",".join(str(x) for x in a.layers)
        lines.append(f"{name:20s} {layers:28s} {a.budget:4d} {100 * a.success_pre:11.1f}% {post:>13s}")
    d = result.defense
    if d:
        lines.append("")
        lines.append(f"defense {d['name']} ({d['editor']}, {d['protocol']}), {d.get('n_deleted', 0)} facts deleted:")
        for k in ("rewrite_score", "paraphrase_score", "neighborhood_score", "neighborhood_delta_acc", "efficacy"):
            v = d.get(k)
            if isinstance(v, (int, float)):
                lines.append(f"  {k:24s} {v:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
