"""The ``probe-attack`` command line.

    probe-attack run    [--model M] [--facts F] [--defense fact-erasure] [--attacks ...] [--out DIR]
    probe-attack attack [--model M] [--facts F] [--attacks ...] [--out DIR]
    probe-attack grid   [--model M] [--facts F] [--defenses all] [--attacks all] [--editor constrained-ft] [--out DIR]
    probe-attack tuned-lens [--model M] [--minutes 8] [--out FILE] [--exclude-facts FILE]
    probe-attack train-vlm [--steps 6000] [--seed 0] [--out F.pt] [--eval-only WEIGHTS]
    probe-attack models
    probe-attack image-facts --out DIR [--relations capital,language] [--per-strength 2] [--seed 0]
    probe-attack import-unlok-vqa RECORDS --coco DIR [--paraphrase-images DIR] [--neighborhood-images DIR] --out F

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


def _device_map_flag(p: argparse.ArgumentParser) -> None:
    """``--device-map`` (run, grid, calibrate); validated by :func:`probe.model.dispatch`."""
    p.add_argument("--device-map", default=None,
                   help="spread the model over the devices with accelerate: auto, balanced, balanced_low_0 or "
                        "sequential (decoder layers are never split) instead of moving it to --device; editing "
                        "needs every edited weight on a device")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="embedded default (smollm2-135m) if omitted; also gemma-3-270m, mini-vlm (the embedded "
                        "multimodal LLaVA), a mini-VLM weights file (.pt from train-vlm), a .gguf file, a local "
                        "Hugging Face directory (LLaVA directories need their processor saved there), or a Hugging "
                        "Face id already in the local cache")
    p.add_argument("--facts", default=None,
                   help="facts file (JSONL, or CounterFact JSON; JSONL facts may carry images); built-in set if "
                        "omitted (the built-in flag image facts on a multimodal model)")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "counterfact"], help="facts file format")
    p.add_argument("--out", default=None,
                   help="output folder (default: a new runs/<date-time>; an existing run is never overwritten)")
    p.add_argument("--attacks", default="head-projection,probability-delta,pd2",
                   help="comma-separated attacks, or 'all': logit-lens head-projection, probability-delta, pd2; "
                        "blackbox question-rephrase, jailbreak; relearning; tuned-lens; linear-probe "
                        "(default: the three logit-lens attacks)")
    p.add_argument("--max-facts", type=int, default=None,
                   help="use at most N facts, evenly spaced over the (known) facts; default: all facts of a "
                        f"--facts file, {BUILTIN_DEFAULT_MAX} of the built-in set (so the default job takes a few "
                        "minutes on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: auto)")
    p.add_argument("--bb-tokens", type=int, default=None,
                   help="new tokens per sample of the blackbox attacks (question-rephrase, jailbreak; default 36 "
                        "as in the papers)")
    p.add_argument("--image-strength", default=None, choices=["easy", "medium", "hard"],
                   help="paraphrase images of image-rephrase / multimodal-rephrase: the original image plus "
                        "paraphrase images up to this strength (default hard: {orig, easy, medium, hard})")
    p.add_argument("--relearn-lr", type=float, default=None,
                   help="relearning attack: LoRA learning rate (default 9e-6, the multimodal reference code's "
                        "fine-tune-after-edit; at that rate 10 epochs barely move SmolLM2 -- try 1e-3)")
    p.add_argument("--relearn-epochs", type=int, default=None, help="relearning attack: epochs (default 10)")
    p.add_argument("--relearn-rank", type=int, default=None, help="relearning attack: LoRA rank (default 2)")
    p.add_argument("--keep-answer-in-input", action="store_true",
                   help="sampling attacks also score facts whose answer occurs in the text they are given (prompt, "
                        "subject, preamble, prefix); by default such facts are skipped and counted, since a copy of "
                        "the input is not extraction (for comparison with the papers, which keep them)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _device_map_flag(p)
    p.add_argument("--dtype", default=None, help="weights dtype: float32 (default), bfloat16, float16; lens "
                                                 "and loss arithmetic always run in fp32")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed (blackbox sampling, relearning data, error-injection fallback targets, torch)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_run(sub) -> None:
    """``run``: filter, attack, delete, attack again, report."""
    run = sub.add_parser("run", help="the main job: filter known facts, attack, delete, attack again, report",
                         description="Filter known facts, run whitebox attacks, delete each fact with a defense, "
                                     "attack again and measure the deletion; writes results.json, per_fact.jsonl "
                                     "and report.html in --out.")
    _common(run)
    run.add_argument("--defense", default="fact-erasure",
                     help="deletion objective: fact-erasure (default), empty-response, error-injection, "
                          "head-projection, max-entropy, input-rephrasing")
    _editor_flags(run)
    _calibration_flag(run)
    run.add_argument("--protocol", default="one-at-a-time", choices=["one-at-a-time", "all-at-once"],
                     help="delete each fact from a fresh copy (papers' protocol) or all facts in one edit")
    _known_flags(run)
    run.add_argument("--retain-size", type=int, default=4,
                     help="retain prompts per edit: other facts' prompts most similar to the deleted one (default 4)")
    run.add_argument("--acc-tokens", type=int, default=8,
                     help="greedy tokens generated for neighborhood accuracy (paper: 36)")
    run.add_argument("--random-n", type=int, default=10,
                     help="other facts per edit for the random Δ-Acc (default 10, as UnLOK-VQA)")
    _gen_tokens_flag(run)
    run.add_argument("--causal-traces", type=int, default=0,
                     help="causal traces (layer x position, subject corrupted) of the first N deleted facts, with "
                          "the unedited and the edited model as clean run, in causal_traces.jsonl and the report "
                          "(~15-30 s per fact on 2 cores; default 0)")


def _known_flags(p) -> None:
    p.add_argument("--known", default="rank", choices=["rank", "reference"],
                   help="known-fact filter: 'rank' (default; the answer's first token at rank <= --known-rank at the "
                        "output) or 'reference' (the text paper's rule: p(answer) > 0.02 and the answer in the greedy "
                        "36-token continuation)")
    p.add_argument("--known-rank", type=int, default=1,
                   help="with --known rank: keep facts whose answer's first token has rank <= N before deletion "
                        "(default 1)")


def _gen_tokens_flag(p) -> None:
    p.add_argument("--gen-tokens", type=int, default=36,
                   help="greedy tokens generated from the prompt and every paraphrase, before and after each edit, "
                        "for the generation-based deletion scores (generation_efficacy, "
                        "generation_paraphrase_efficacy; default 36 as in the text paper; 0 = off)")


def _add_grid(sub) -> None:
    """``grid``: every defense x attack on the known facts."""
    grid = sub.add_parser("grid", help="every defense x attack on the known facts: grid.json + report.html",
                          description="Delete each known fact with each selected defense (one at a time, fresh copy), "
                                      "run every selected attack before and after, and write grid.json (one record "
                                      "per defense x attack cell), pre.jsonl/units.jsonl (per fact) and report.html "
                                      "in --out. --resume skips finished facts and cells.")
    _common(grid)
    grid.set_defaults(attacks=",".join(["head-projection", "probability-delta", "pd2", "question-rephrase",
                                        "jailbreak", "relearning"]))
    grid.add_argument("--defenses", default="all",
                      help="comma-separated defenses or 'all' (fact-erasure, empty-response, error-injection, "
                           "head-projection, max-entropy, input-rephrasing)")
    _editor_flags(grid)
    _calibration_flag(grid)
    _known_flags(grid)
    grid.add_argument("--retain-size", type=int, default=4, help="retain prompts per edit (default 4)")
    grid.add_argument("--random-n", type=int, default=10, help="other facts per edit for the random Δ-Acc (default 10)")
    grid.add_argument("--acc-tokens", type=int, default=8, help="greedy tokens for the accuracy metrics (default 8)")
    _gen_tokens_flag(grid)
    grid.add_argument("--workers", type=int, default=None,
                      help="run the (fact, defense) units on N Ray workers, each with its own model (one GPU each "
                           "with --device cuda); starts a local Ray instance unless --ray-address is given. Same "
                           "results as serially; --resume works across worker counts. Needs "
                           "pip install 'probe-attack[ray]'")
    grid.add_argument("--ray-address", default=None, metavar="ADDR",
                      help="join this Ray cluster (ray.init(address=ADDR)) instead of starting a local one; workers "
                           "default to one per GPU (--device cuda) or CPU of the cluster")


def _add_attack(sub) -> None:
    """``attack``: attacks only, no filter and no deletion."""
    att = sub.add_parser("attack", help="attacks only (no filter, no deletion) on every fact, e.g. of a model "
                                        "you already edited",
                         description="Run the whitebox attacks on every given fact, without filtering or "
                                     "deletion; writes results.json, per_fact.jsonl and report.html in --out.")
    _common(att)


def _add_models(sub) -> None:
    """``models``: list model short names and architectures."""
    sub.add_parser("models", help="list model short names and supported architectures")


def _add_image_facts(sub) -> None:
    """``image-facts``: write the built-in flag image fact set."""
    imf = sub.add_parser("image-facts", help="write the built-in image (flag) fact set: images + facts.jsonl",
                         description="Render the flag images and write the built-in multimodal fact set (one fact "
                                     "per country x relation, with paraphrase and neighbourhood images) into a "
                                     "new folder --out; prints the facts.jsonl path.")
    imf.add_argument("--out", required=True, help="new (or empty) output folder")
    imf.add_argument("--relations", default="capital,language,continent,currency",
                     help="comma-separated relations (default: capital,language,continent,currency)")
    imf.add_argument("--countries", default=None, help="comma-separated country names (default: all flags)")
    imf.add_argument("--per-strength", type=int, default=2,
                     help="paraphrase images per strength easy/medium/hard (default 2)")
    imf.add_argument("--neighborhood-images", type=int, default=3,
                     help="other countries' flags per fact (default 3)")
    imf.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    imf.add_argument("--seed", type=int, default=0, help="base seed of the renders (default 0)")


def _add_import_unlok_vqa(sub) -> None:
    """``import-unlok-vqa``: convert UnLOK-VQA records to a facts JSONL."""
    unl = sub.add_parser("import-unlok-vqa", help="convert UnLOK-VQA records (+ COCO images) to a facts JSONL",
                         description="Read UnLOK-VQA records (JSON list or JSONL), find their COCO-2017 images "
                                     "(train2017/, then val2017/, then the --coco folder itself) and the optional "
                                     "paraphrase / neighbourhood images, and write a facts JSONL with absolute "
                                     "image paths.")
    unl.add_argument("records", help="UnLOK-VQA records file (JSON list or JSONL)")
    unl.add_argument("--coco", required=True, help="COCO-2017 root folder (train2017/, val2017/)")
    unl.add_argument("--paraphrase-images", default=None,
                     help="root of the paraphrase images (parap_images/, parap_images_medium/, "
                          "paraphrase_images_hard/)")
    unl.add_argument("--neighborhood-images", default=None,
                     help="root of the neighbourhood images (neigh_easy/, neigh_med/, neighborhood_images_hard/)")
    unl.add_argument("--limit", type=int, default=None, help="import the first N records")
    unl.add_argument("--out", required=True, help="output facts file (.jsonl)")


def _add_tuned_lens(sub) -> None:
    """``tuned-lens``: train or load a tuned lens and print its KL table."""
    tl = sub.add_parser("tuned-lens", help="train (or load) the model's tuned lens and print the per-layer KL table",
                        description="Train (or load from the cache) the tuned lens of a model and print, per decoder "
                                    "layer, the held-out KL(final || lens) in nats of the logit lens and of the tuned "
                                    "lens.")
    tl.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m)")
    tl.add_argument("--minutes", type=float, default=8.0, help="training wall-clock budget (default 8)")
    tl.add_argument("--steps", type=int, default=None, help="maximum Adam steps (default: until --minutes)")
    tl.add_argument("--out", default=None, help="also write the report as JSON to this file")
    tl.add_argument("--retrain", action="store_true", help="train even if a cached lens exists (and replace it)")
    tl.add_argument("--exclude-facts", metavar="FILE", default=None,
                    help="facts file (JSONL or CounterFact JSON) whose answers and subjects are dropped from the "
                         "training text, besides the built-in facts' (e.g. the CounterFact file you evaluate on)")
    tl.add_argument("--seed", type=int, default=0)
    tl.add_argument("--device", default="cpu")
    tl.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_vlm(sub) -> None:
    """``train-vlm``: train (or evaluate) the mini VLM."""
    vlm = sub.add_parser("train-vlm", help="train the mini VLM (vision tower + projector on frozen SmolLM2) and "
                                           "print its accuracy",
                         description="Train the mini VLM's vision tower and projector (anchor alignment on "
                                     "procedurally drawn flags, frozen SmolLM2-135M) and report top-1 "
                                     "first-token accuracy on fresh easy/medium/hard images next to the "
                                     "text-only ceiling. Deterministic for a given --seed on CPU.")
    vlm.add_argument("--out", default=None, help="weights file (default: <cache>/mini-vlm/mini_vlm.pt); use it with "
                                                 "--model FILE.pt")
    vlm.add_argument("--steps", type=int, default=6000, help="optimisation steps (default 6000, ~10 min on 2 cores)")
    vlm.add_argument("--batch-size", type=int, default=64)
    vlm.add_argument("--lr", type=float, default=2e-3)
    vlm.add_argument("--seed", type=int, default=0)
    vlm.add_argument("--eval-only", metavar="WEIGHTS", default=None,
                     help="skip training: evaluate this weights file (e.g. the shipped probe/data/mini_vlm.pt)")
    vlm.add_argument("--per-strength", type=int, default=2, help="evaluation images per strength and country")


def _add_calibrate(sub) -> None:
    """``calibrate``: choose each objective's strongest setting within a damage target."""
    cal = sub.add_parser("calibrate", help="choose, per defense, the strongest edit whose damage stays within a target "
                                           "(matched damage); cached and used by run and grid",
                         description="For each deletion objective, measure the editor's settings from the weakest "
                                     "edit up on calibration facts (known facts of --facts, default the built-in "
                                     "facts) and keep the strongest whose mean neighborhood score and retention drop "
                                     "stay within the target. Prints the table; the result is cached per model "
                                     "fingerprint and editor, and run / grid use it by default (--calibration).")
    cal.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m)")
    cal.add_argument("--editor", default="constrained-ft", help="editor: constrained-ft (default), lora, rome")
    cal.add_argument("--objectives", default="all", help="comma-separated defenses or 'all' (default)")
    cal.add_argument("--facts", default=None, help="calibration facts file (default: the built-in facts)")
    cal.add_argument("--format", default="auto", choices=["auto", "jsonl", "counterfact"], help="facts file format")
    cal.add_argument("--n-facts", type=int, default=8, help="calibration facts per setting (default 8)")
    cal.add_argument("--min-neighborhood", type=float, default=0.9,
                     help="damage target: mean neighborhood score at least this (default 0.9)")
    cal.add_argument("--max-retention-drop", type=float, default=0.02,
                     help="damage target: mean retention drop on the other known facts at most this (default 0.02)")
    _known_flags(cal)
    cal.add_argument("--retain-size", type=int, default=4, help="retain prompts per edit (default 4)")
    cal.add_argument("--out", default=None,
                     help="folder for calibration.json and its unit log (default: the cache, where run and grid "
                          "find it); an interrupted calibration resumes from its log")
    cal.add_argument("--device", default="cpu")
    _device_map_flag(cal)
    cal.add_argument("--dtype", default=None)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--quiet", action="store_true", help="no progress bars")


def _calibration_flag(p) -> None:
    p.add_argument("--calibration", default="auto", metavar="auto|none|FILE",
                   help="editor settings per defense: 'auto' (default) uses the cached or shipped calibration of "
                        "this model and editor (probe-attack calibrate) when there is one, 'none' the defenses' "
                        "built-in settings, FILE a calibration.json; explicit editor flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probe-attack",
        description="Is deleted knowledge really gone? Delete facts from a language model and try to read "
                    "them back out of its residual stream, layer by layer.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_grid(sub)
    _add_attack(sub)
    _add_models(sub)
    _add_image_facts(sub)
    _add_import_unlok_vqa(sub)
    _add_tuned_lens(sub)
    _add_train_vlm(sub)
    _add_calibrate(sub)
    return parser


def _editor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--editor", default="constrained-ft", help="editor: constrained-ft (default), lora, rome")
    p.add_argument("--edit-layer", type=int, default=None, help="decoder layer whose MLP is edited")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per edit")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the edit")
    p.add_argument("--norm-bound", type=float, default=None,
                   help="constrained-ft: element-wise bound |W - W0| of the edit")
    p.add_argument("--retain-weight", type=float, default=None, help="weight of the KL retain loss")


def _editor_config(args) -> dict:
    """Editor settings from the flags, checked against the chosen editor's fields.

    Raises:
        ValueError: unknown editor, or a flag the editor does not have.
    """
    import dataclasses

    from defenses import EDITORS

    if args.editor not in EDITORS:
        raise ValueError(f"unknown editor {args.editor!r}; valid editors: {', '.join(EDITORS)}")
    flags = {"layer": ("--edit-layer", args.edit_layer), "steps": ("--steps", args.steps), "lr": ("--lr", args.lr),
             "norm_bound": ("--norm-bound", args.norm_bound), "retain_weight": ("--retain-weight", args.retain_weight)}
    cls = EDITORS[args.editor]
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out = {}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key not in names:
            raise ValueError(f"{flag} does not apply to editor {args.editor}")
        out[key] = value
    return out


def _attack_config(args, attacks: list[str]) -> dict:
    """Per-attack settings from the flags: each flag goes to every selected attack that has the
    matching field (``--bb-tokens`` -> ``max_new_tokens``, ``--image-strength`` -> ``strength``,
    ``--keep-answer-in-input`` -> ``skip_answer_in_input=False``, ``--relearn-lr/-epochs/-rank`` ->
    ``lr`` / ``epochs`` / ``rank``)."""
    from attacks import attack_fields

    flags = {"max_new_tokens": args.bb_tokens, "strength": args.image_strength, "lr": args.relearn_lr,
             "epochs": args.relearn_epochs, "rank": args.relearn_rank,
             "skip_answer_in_input": False if args.keep_answer_in_input else None}
    out: dict = {}
    for name in attacks:
        fields = attack_fields(name)
        cfg = {k: v for k, v in flags.items() if v is not None and k in fields}
        if cfg:
            out[name] = cfg
    return out


def _fail(msg: str, code: int = EXIT_INPUT) -> int:
    print(f"probe-attack: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tuned-lens":
        return _tuned_lens(args)
    if args.command == "train-vlm":
        return _train_vlm(args, argv)
    args.attacks_given = any(a == "--attacks" or a.startswith("--attacks=") for a in argv)
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
    if args.command in ("image-facts", "import-unlok-vqa"):
        try:
            return _image_facts(args) if args.command == "image-facts" else _import_unlok_vqa(args)
        except ProbeAttackError as exc:
            return _fail(str(exc))
        except KeyboardInterrupt:  # both writers are atomic: nothing was written
            print("\nprobe-attack: interrupted; nothing written", file=sys.stderr)
            return EXIT_INTERRUPTED
    from .interrupt import graceful_interrupts

    try:
        with graceful_interrupts():
            return _calibrate(args) if args.command == "calibrate" else _run(args)
    except ProbeAttackError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # unknown attack/defense/editor names, bad layer indices
        return _fail(str(exc))
    except KeyboardInterrupt:
        out = getattr(args, "out", None) or "the output folder"
        files = "pre.jsonl and units.jsonl" if args.command == "grid" else "per_fact.jsonl"
        print(f"\nprobe-attack: interrupted; finished facts are saved in {out} ({files}) -- "
              f"rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


def _calibrate(args) -> int:
    from .facts import load_facts
    from .jobs import resolve_names
    from .jobs.calibrate import CalibrateConfig, calibrate, calibration_dir, format_calibration
    from .model import load_model

    from defenses import EDITORS

    if args.editor not in EDITORS:
        return _fail(f"unknown editor {args.editor!r}; valid editors: {', '.join(EDITORS)}")
    objectives = resolve_names(args.objectives, "defense")
    if args.n_facts < 1:
        return _fail("--n-facts must be >= 1")
    if not 0 <= args.min_neighborhood <= 1 or not 0 <= args.max_retention_drop <= 1:
        return _fail("--min-neighborhood and --max-retention-drop must be within [0, 1]")
    if args.retain_size < 0:
        return _fail("--retain-size must be >= 0")
    facts = load_facts(args.facts, args.format)
    if not args.quiet:
        print(f"loading model {args.model or 'smollm2-135m (embedded default)'} ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    cfg = CalibrateConfig(editor=args.editor, objectives=objectives, n_facts=args.n_facts,
                          min_neighborhood=args.min_neighborhood, max_retention_drop=args.max_retention_drop,
                          retain_size=args.retain_size, seed=args.seed, progress=not args.quiet,
                          known=args.known, known_rank=args.known_rank)
    out = Path(args.out) if args.out else calibration_dir(model, args.editor)
    cal = calibrate(model, facts, cfg, facts_label=str(Path(args.facts).resolve()) if args.facts else "built-in",
                    out=out)
    print(format_calibration(cal))
    print(f"\ncalibration: {out / 'calibration.json'}")
    return 0


def _calibration_record(args, model) -> dict:
    """The job's calibration (:meth:`probe.jobs.calibrate.Calibration.job_record`) from ``--calibration``;
    ``{}`` for none. Raises InputError for an unreadable file or one for another model or editor."""
    from .errors import InputError
    from .jobs.calibrate import Calibration, load_calibration

    choice = getattr(args, "calibration", "none")
    if choice == "none":
        return {}
    if choice == "auto":
        found = load_calibration(model, args.editor)
        if found is None:
            if not args.quiet:
                print(f"probe-attack: no calibration of {model.name} with editor {args.editor} "
                      f"(probe-attack calibrate); each defense uses its built-in settings", file=sys.stderr)
            return {}
        return found[0].job_record(found[1])
    try:
        cal = Calibration.load(choice)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc), file=choice, field="calibration") from None
    if cal.fingerprint != model.fingerprint or cal.editor != args.editor:
        raise InputError(f"calibration of {cal.model} ({cal.fingerprint}) with editor {cal.editor}, but the job uses "
                         f"{model.name} ({model.fingerprint}) with editor {args.editor}", file=choice,
                         field="calibration")
    return cal.job_record(str(Path(choice).resolve()))


def calibration_line(calibration: dict) -> str:
    """One line saying which editor settings the defenses ran at."""
    if not calibration:
        return "\nedit settings: each defense's built-in settings (no calibration; see probe-attack calibrate)"
    unmet = [k for k, v in calibration.get("met", {}).items() if not v]
    note = f"; target not met by any setting for {', '.join(unmet)}" if unmet else ""
    return (f"\nedit settings: calibrated for matched damage (neighborhood >= {calibration['min_neighborhood']}, "
            f"retention drop <= {calibration['max_retention_drop']}{note}): {calibration['source']}")


def _tuned_lens(args) -> int:
    from .lens_training import tuned_lens_command

    return tuned_lens_command(model=args.model, minutes=args.minutes, steps=args.steps, out=args.out,
                              retrain=args.retrain, seed=args.seed, device=args.device, quiet=args.quiet,
                              exclude_facts=args.exclude_facts)


def _train_vlm(args, argv: list[str]) -> int:
    from .vlm.mini_vlm import train_vlm_command

    return train_vlm_command(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             eval_only=args.eval_only, per_strength=args.per_strength,
                             command="probe-attack train-vlm " + " ".join(argv[1:]))


def _image_facts(args) -> int:
    from .facts import load_jsonl
    from .vlm.image_facts import write_builtin_image_facts

    path = write_builtin_image_facts(args.out, relations=args.relations, countries=args.countries,
                                     n_per_strength=args.per_strength,
                                     n_neighborhood_images=args.neighborhood_images, seed=args.seed, size=args.size)
    facts = load_jsonl(path)
    n_images = len(list((path.parent / "images").glob("*.png")))
    n_countries = len({f.entity for f in facts})
    print(f"wrote {len(facts)} facts ({n_countries} countries x {len(facts) // max(n_countries, 1)} relations) "
          f"and {n_images} images")
    print(f"facts:   {path}")
    return 0


def _import_unlok_vqa(args) -> int:
    from .vlm.unlok_vqa import import_unlok_vqa

    facts = import_unlok_vqa(args.records, args.coco, paraphrase_root=args.paraphrase_images,
                             neighborhood_root=args.neighborhood_images, limit=args.limit, out=args.out)
    n_par = sum(len(v) for f in facts for v in f.image_paraphrases.values())
    n_nei = sum(len(f.neighborhood_images) for f in facts)
    print(f"imported {len(facts)} facts ({n_par} paraphrase images, {n_nei} neighbourhood images)")
    print(f"facts:   {args.out}")
    return 0


def _run(args) -> int:
    import torch

    from .facts import load_facts
    from .model import load_model
    from .jobs import RunConfig, run_attack, run_main

    if args.out is None:
        if args.resume:
            return _fail("--resume needs the --out folder of the run to continue")
        import time

        args.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if args.max_facts is not None and args.max_facts < 1:
        return _fail("--max-facts must be >= 1")
    from .jobs import resolve_names

    if not [a for a in args.attacks.split(",") if a.strip()]:
        return _fail("--attacks is empty")
    attacks = resolve_names(args.attacks, "attack")  # ValueError lists the valid names
    if args.relearn_lr is not None and not args.relearn_lr > 0:
        return _fail("--relearn-lr must be > 0")
    for flag, value, low in (("--bb-tokens", args.bb_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--relearn-epochs", args.relearn_epochs, 1), ("--relearn-rank", args.relearn_rank, 1),
                             ("--steps", getattr(args, "steps", None), 1),
                             ("--acc-tokens", getattr(args, "acc_tokens", None), 1),
                             ("--retain-size", getattr(args, "retain_size", None), 0),
                             ("--random-n", getattr(args, "random_n", None), 0),
                             ("--gen-tokens", getattr(args, "gen_tokens", None), 0),
                             ("--known-rank", getattr(args, "known_rank", None), 1),
                             ("--workers", getattr(args, "workers", None), 1)):
        if value is not None and value < low:
            return _fail(f"{flag} must be >= {low}")
    if getattr(args, "workers", None) is not None or getattr(args, "ray_address", None) is not None:
        from .jobs.shard import check_ray

        check_ray(args.workers)  # RunError (one line) before the model is loaded
    import torch as _torch

    try:
        dev = _torch.device(args.device)
    except (RuntimeError, TypeError) as exc:
        return _fail(f"--device {args.device!r}: {exc}")
    if dev.type == "cuda" and not _torch.cuda.is_available():
        return _fail(f"--device {args.device}: CUDA is not available in this torch build/machine")
    editor_config = {}
    if args.command in ("run", "grid"):
        from defenses import OBJECTIVES

        if args.command == "run" and args.defense not in OBJECTIVES:
            return _fail(f"unknown defense {args.defense!r}; valid defenses: {', '.join(OBJECTIVES)}")
        defenses = resolve_names(args.defenses, "defense") if args.command == "grid" else [args.defense]
        editor_config = _editor_config(args)
    torch.manual_seed(args.seed)
    facts = load_facts(args.facts, args.format)  # validates before anything is written
    facts_label = str(Path(args.facts).resolve()) if args.facts else "built-in"
    progress = not args.quiet
    if progress:
        print(f"loading model {args.model or 'smollm2-135m (embedded default)'} ...", file=sys.stderr)
    model = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    from .images import is_multimodal

    if args.facts is None and is_multimodal(model):
        from .vlm.image_facts import load_builtin_image_facts

        facts = load_builtin_image_facts()
        facts_label = "built-in image facts (flags)"
        if progress:
            print(f"multimodal model: using the {len(facts)} built-in flag image facts", file=sys.stderr)
    if args.command == "grid" and not args.attacks_given and is_multimodal(model):
        attacks = attacks + [a for a in ("image-rephrase", "multimodal-rephrase") if a not in attacks]
    attack_config = _attack_config(args, attacks)
    max_facts = args.max_facts
    if max_facts is None and args.facts is None and args.command in ("run", "grid"):
        max_facts = BUILTIN_DEFAULT_MAX
        if progress:
            print(f"using {max_facts} of the {len(facts)} built-in facts (evenly spaced); --max-facts N for more",
                  file=sys.stderr)
    calibration = _calibration_record(args, model) if args.command in ("run", "grid") else {}
    if args.command == "grid":
        from .jobs import GridConfig, run_grid

        gcfg = GridConfig(defenses=defenses, attacks=attacks, editor=args.editor, editor_config=editor_config,
                          attack_config=attack_config,
                          known=args.known, known_rank=args.known_rank, max_facts=max_facts, retain_size=args.retain_size,
                          random_n=args.random_n, acc_tokens=args.acc_tokens, gen_tokens=args.gen_tokens,
                          batch_size=args.batch_size, seed=args.seed, progress=progress, calibration=calibration)
        factory = None
        if args.workers is not None or args.ray_address is not None:
            import functools

            factory = functools.partial(load_model, args.model, device=args.device, dtype=args.dtype,
                                        device_map=args.device_map)
        grid = run_grid(model, facts, args.out, gcfg, facts_label=facts_label, resume=args.resume,
                        workers=args.workers, ray_address=args.ray_address, model_factory=factory)
        print(format_grid(grid))
        print(calibration_line(calibration))
        print(f"\ngrid:    {Path(args.out) / 'grid.json'}")
        print(f"report:  {Path(args.out) / 'report.html'}")
        return 0
    cfg = RunConfig(attacks=attacks, max_facts=max_facts, batch_size=args.batch_size, seed=args.seed,
                    progress=progress, attack_config=attack_config)
    if args.command == "run":
        cfg.defense, cfg.editor, cfg.editor_config = args.defense, args.editor, editor_config
        cfg.protocol, cfg.known, cfg.known_rank = args.protocol, args.known, args.known_rank
        cfg.retain_size, cfg.acc_tokens, cfg.random_n = args.retain_size, args.acc_tokens, args.random_n
        cfg.calibration = calibration
        cfg.gen_tokens = args.gen_tokens
        if args.causal_traces < 0:
            return _fail("--causal-traces must be >= 0")
        cfg.causal_traces = args.causal_traces
        result = run_main(model, facts, args.out, cfg, facts_label=facts_label, resume=args.resume)
    else:
        result = run_attack(model, facts, args.out, cfg, facts_label=facts_label, resume=args.resume)
    print(format_table(result))
    if args.command == "run":
        print(calibration_line(calibration))
    print(f"\nresults: {Path(args.out) / 'results.json'}")
    print(f"report:  {Path(args.out) / 'report.html'}")
    return 0


def _p(x, width: int) -> str:
    return f"{'—':>{width}s}" if x is None else f"{100 * x:{width - 1}.1f}%"


def format_table(result) -> str:
    """Plain-text results table: attack success@B (%) before and after the edit, the control's
    success on the attacked model and the excess (post - control; pre - control without an edit),
    and for lens attacks the hidden-only success (output layer removed) after the edit."""
    deleted = result.defense is not None
    lines = [f"model {result.model}: {result.n_facts} facts", "",
             f"{'attack':20s} {'layers':24s} {'B':>4s} {'pre':>7s} {'post':>7s} {'control':>8s} {'excess':>7s} "
             f"{'hidden':>7s} {'B_h':>4s}"]
    for name, a in result.attacks.items():
        where = ",".join(str(x) for x in a.layers) if a.layers and a.kind == "whitebox" else "(" + a.kind + ")"
        hidden = a.success_hidden_post if deleted else a.success_hidden_pre
        bh = f"{a.budget_hidden:4d}" if a.budget_hidden is not None else f"{'':4s}"
        skipped = f"  ({a.n_skipped} of {a.n_facts + a.n_skipped} facts skipped)" if a.n_skipped else ""
        lines.append(f"{name:20s} {where:24s} {a.budget:4d} {_p(a.success_pre, 7)} {_p(a.success_post, 7)} "
                     f"{_p(a.success_control, 8)} {_p(a.excess, 7)} {_p(hidden, 7)} {bh}{skipped}")
    ctl = next((a.control for a in result.attacks.values() if a.control), None)
    lines.append("")
    lines.append(f"control: the same rule on each fact's control answer ({ctl or 'none'}) on the attacked model; "
                 f"excess = {'post' if deleted else 'pre'} - control; hidden = lens attacks without the output layer "
                 f"(budget B_h)")
    d = result.defense
    if d:
        lines.append("")
        failed = f", {d['n_failed']} failed" if d.get("n_failed") else ""
        lines.append(f"defense {d['name']} ({d['editor']}, {d['protocol']}), {d.get('n_deleted', 0)} facts deleted"
                     f"{failed}:")
        from .results import DeletionScores

        for k in DeletionScores.REPORTED:
            v = d.get(k)
            if isinstance(v, (int, float)):
                lines.append(f"  {k:30s} {v:.3f}{_denominator(d, k)}")
    note = pool_note((result.meta or {}).get("pools"))
    if note:
        lines += ["", note]
    return "\n".join(lines)


def pool_note(pools: dict | None) -> str:
    """One line naming the metrics and attacks whose pool of other facts was topped up with the
    built-in facts (the file gave too few, :mod:`probe.pool`), with the units it happened in; ``""``
    when none was."""
    from .pool import TOPPED_UP

    parts = [f"{name} {rec[TOPPED_UP]}" for kind in ("metrics", "attacks")
             for name, rec in sorted(((pools or {}).get(kind) or {}).items()) if rec.get(TOPPED_UP)]
    return ("pools topped up with the built-in facts (the file's other facts were too few; units): " + ", ".join(parts)
            if parts else "")


def _denominator(scores: dict, key: str) -> str:
    """What a reported mean score is taken over, from the denominator fields
    (:attr:`probe.results.DeletionScores.DENOMINATORS`), as a note for the tables; ``""`` if none."""
    pct = {"generation_efficacy": ("generation_acc_pre", "facts"),
           "generation_paraphrase_efficacy": ("generation_paraphrase_acc_pre", "paraphrases")}
    if key in pct and isinstance(scores.get(pct[key][0]), (int, float)):
        return (f"  (on the {pct[key][1]} the unedited model generated the answer for: "
                f"{100 * scores[pct[key][0]]:.0f}%)")
    if key == "retention_drop" and isinstance(scores.get("retention_n"), (int, float)):
        return f"  (top-1 accuracy pre - post on {scores['retention_n']:.0f} other known facts)"
    return ""


def format_grid(grid) -> str:
    """Plain-text grid (a :class:`~probe.results.GridResult` or its ``grid.json`` dict): attack
    success@B (%) before -> after, per defense, then the defense scores."""
    grid = grid.to_dict() if hasattr(grid, "to_dict") else grid
    cells = {(c["defense"], c["attack"]): c for c in grid["cells"]}
    attacks = grid["attacks"]
    defenses = [d for d in grid["defenses"] if any((d, a) in cells for a in attacks)]
    lines = [f"model {grid['model']}, editor {grid['editor']}: {grid['n_facts']} known facts "
             f"({'complete' if grid['complete'] else 'partial'})", ""]
    width = max([len(d) for d in defenses] + [8])
    head = f"{'defense':{width}s} " + " ".join(f"{a[:17]:>17s}" for a in attacks)
    lines.append(head)
    budgets = " ".join(f"{'B=' + str(next((cells[(d, a)]['budget'] for d in defenses if (d, a) in cells), '?')):>17s}"
                       for a in attacks)
    lines.append(f"{'':{width}s} {budgets}")
    first = {a: next((cells[(d, a)] for d in defenses if (d, a) in cells), None) for a in attacks}

    def cell(c, attr, ctl):
        if not c or c.get(attr) is None:
            return f"{'—':>17s}"
        txt = f"{100 * c[attr]:.1f}"
        if c.get(ctl) is not None:
            txt += f" (c {100 * c[ctl]:.1f})"
        return f"{txt:>17s}"

    lines.append(f"{'unedited':{width}s} " + " ".join(cell(first[a], "success_pre", "success_control_pre")
                                                      for a in attacks))
    for d in defenses:
        lines.append(f"{d:{width}s} " + " ".join(cell(cells.get((d, a)), "success_post", "success_control")
                                               for a in attacks))
    lines += ["", "success after each defense in %, (c ...) = the same rule on the control answers; "
              "excess (post - control):"]
    for d in defenses:
        row = []
        for a in attacks:
            c = cells.get((d, a))
            row.append(f"{'—':>17s}" if not c or c.get("excess") is None else f"{100 * c['excess']:17.1f}")
        lines.append(f"{d:{width}s} " + " ".join(row))
    cols = [("rewrite", "rewrite_score"), ("gen", "generation_efficacy"), ("paraphr", "paraphrase_score"),
            ("genPara", "generation_paraphrase_efficacy"), ("neighb", "neighborhood_score"),
            ("nΔAcc", "neighborhood_delta_acc"), ("rΔAcc", "random_delta_acc"), ("retΔ", "retention_drop"),
            ("target", "target_rewrite_score")]
    lines += ["", f"{'defense':{width}s} " + " ".join(f"{h:>8s}" for h, _ in cols) + f" {'failed':>7s}"]

    def f(v):
        return f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'—':>8s}"

    for d in defenses:
        c = next(cells[(d, a)] for a in attacks if (d, a) in cells)
        lines.append(f"{d:{width}s} " + " ".join(f(c.get(k)) for _, k in cols) + f" {c['n_failed']:7d}")
    lines += ["", "gen / genPara: greedy continuations of the prompt / paraphrases that no longer contain the answer, "
              "over those that did before the edit; retΔ: drop of first-token top-1 accuracy on every other known "
              "fact (retention_drop)"]
    note = pool_note(grid.get("pools"))
    if note:
        lines += [note]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
