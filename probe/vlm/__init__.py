"""Multimodal data and training: the mini VLM, its procedurally drawn flags, the built-in image
facts and the UnLOK-VQA importer.

- :mod:`probe.vlm.mini_vlm` -- the embedded multimodal default (a mini LLaVA) and its training
- :mod:`probe.vlm.flags` -- 72 national flags drawn with numpy/PIL, with augmentations
- :mod:`probe.vlm.image_facts` -- the built-in flag image facts
- :mod:`probe.vlm.unlok_vqa` -- UnLOK-VQA records (+ COCO images) -> facts JSONL

The core (:mod:`probe.images`: image prompts and image-token expansion) stays in :mod:`probe`.
This package may import :mod:`probe.model`, never the reverse: importing it registers the mini
VLM with :func:`probe.model.register_model_loader`, so ``load_model("mini-vlm")`` and
``load_model("weights.pt")`` work (``import probe`` imports this package).
"""

from __future__ import annotations

from pathlib import Path

from ..model import register_model_loader


def _load_named(name: str, *, device="cpu"):
    from .mini_vlm import load_mini_vlm

    return load_mini_vlm(device=device)


def _load_weights_file(path: Path, *, device="cpu"):
    from .mini_vlm import load_mini_vlm

    return load_mini_vlm(path, device=device)


register_model_loader("mini-vlm", _load_named, aliases=("minivlm", "mini_vlm"),
                      description="the project's mini LLaVA: a trained 64-px vision tower + projector (shipped) on "
                                  "SmolLM2-135M")
register_model_loader(lambda path: path.suffix == ".pt", _load_weights_file)
