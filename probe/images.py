"""Prompts with images for LLaVA-architecture models.

A multimodal prompt is an :class:`ImagePrompt`: a ``str`` (the text) that also carries an image.
Everything that takes prompts (lens readouts, attacks, defense losses, metrics) takes image
prompts unchanged; the image travels with the text through concatenation (``prefix + prompt``,
``prompt + " " + answer``), so a rephrasing keeps its image.

Tokenisation follows the original LLaVA code (Liu et al. 2023, ``IMAGE_TOKEN_INDEX = -200``):
the image's place in the token row is one *negative placeholder id*; :func:`probe.tokens.encode_ids`
expands each placeholder into the model's image tokens (``image_seq_len`` copies of its
``image_token_id``, the expanded sequence the language model really sees) and stacks the images'
``pixel_values``. All positions the toolkit reads are counted from the end of the expanded row,
so the answer position is the last prompt token of the *expanded* sequence (UnLOK-VQA, TMLR
2025; method.md section 2) -- never a text-only index.

Images are referenced by path (``str``/``Path``) or given as ``PIL.Image``; each distinct image
gets one placeholder id for the life of the process, and its preprocessed pixels are cached per
image processor.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import InputError

#: The image placeholder in prompt text (llava-hf's ``processor.image_token``).
IMAGE_TOKEN = "<image>"
#: Placeholder ids are ``PLACEHOLDER_BASE - k`` for the k-th registered image (LLaVA uses -200).
PLACEHOLDER_BASE = -200

_lock = threading.Lock()
_images: list[Any] = []          # k -> image (path string or PIL image)
_keys: dict[Any, int] = {}       # path string / id(PIL image) -> k
_pixels: dict[tuple[int, int], torch.Tensor] = {}  # (k, id(image processor)) -> [3, H, W]


class ImagePrompt(str):
    """Prompt text with an image attached.

    The text may contain :data:`IMAGE_TOKEN` where the image goes; otherwise the image comes first,
    followed by a newline (LLaVA's ``"<image>\\n" + question``).

    Concatenation keeps the image: ``"A man who was. " + p`` and ``p + " Paris"`` are image
    prompts with ``p.image``; f-strings, ``.format`` and slicing give plain text.

    Args:
        text: the prompt text.
        image: a path (``str``/``Path``) or a ``PIL.Image.Image``.
    """

    image: Any

    def __new__(cls, text: str, image: Any):
        if image is None:
            raise InputError("an image prompt needs an image", field="image")
        obj = super().__new__(cls, text)
        obj.image = str(image) if isinstance(image, Path) else image
        return obj

    def __add__(self, other):
        if isinstance(other, ImagePrompt) and other.image is not self.image:
            raise InputError("cannot join two prompts with different images", field="prompt")
        return ImagePrompt(str.__add__(str(self), str(other)), self.image)

    def __radd__(self, other):
        return ImagePrompt(str(other) + str(self), self.image)

    def __reduce__(self):
        return (ImagePrompt, (str(self), self.image))

    def __eq__(self, other):
        if isinstance(other, ImagePrompt):
            return str.__eq__(self, other) and image_key(self.image) == image_key(other.image)
        return False if isinstance(other, str) else NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self):
        return hash((str(self), image_key(self.image)))

    # a total order that includes the image: prompts with the same text and other images sort by
    # image path, so sorted(set_of_prompts) does not depend on hash randomisation
    def _key(self):
        return (str(self), str(image_key(self.image)))

    def __lt__(self, other):
        return self._key() < _sort_key(other) if isinstance(other, str) else NotImplemented

    def __le__(self, other):
        return self._key() <= _sort_key(other) if isinstance(other, str) else NotImplemented

    def __gt__(self, other):
        return self._key() > _sort_key(other) if isinstance(other, str) else NotImplemented

    def __ge__(self, other):
        return self._key() >= _sort_key(other) if isinstance(other, str) else NotImplemented

    @property
    def text(self) -> str:
        """The text with the image placeholder where the image goes."""
        s = str(self)
        return s if IMAGE_TOKEN in s else IMAGE_TOKEN + "\n" + s

    def with_text(self, text: str) -> "ImagePrompt":
        """Same image, other text."""
        return ImagePrompt(text, self.image)


def _sort_key(x: str) -> tuple[str, str]:
    return x._key() if isinstance(x, ImagePrompt) else (str(x), "")


def with_image(text: str, image: Any) -> str:
    """``ImagePrompt(text, image)``, or ``text`` itself when ``image`` is None."""
    return text if image is None else ImagePrompt(str(text), image)


def image_of(prompt: Any) -> Any:
    """The image of an :class:`ImagePrompt` (None for plain text)."""
    return getattr(prompt, "image", None) if isinstance(prompt, ImagePrompt) else None


def plain_text(prompt: str) -> str:
    """The prompt's text without its image placeholder (what a text-only model is asked)."""
    return str(prompt).replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip(" ")


def image_key(image: Any):
    """What identifies an image: its path, or the object's identity for an in-memory image."""
    return str(image) if isinstance(image, (str, Path)) else ("obj", id(image))


def placeholder_id(image: Any) -> int:
    """The negative placeholder id of ``image`` (registered on first use)."""
    key = image_key(image)
    with _lock:
        k = _keys.get(key)
        if k is None:
            k = len(_images)
            _images.append(str(image) if isinstance(image, Path) else image)
            _keys[key] = k
    return PLACEHOLDER_BASE - k


def is_placeholder(token_id: int) -> bool:
    return token_id <= PLACEHOLDER_BASE


def image_for(token_id: int) -> Any:
    """The image a placeholder id stands for."""
    return _images[PLACEHOLDER_BASE - token_id]


def open_image(image: Any, *, field: str = "image"):
    """``image`` as an RGB ``PIL.Image``.

    Raises:
        InputError: the file is missing or not a readable image (naming the file and field).
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(str(image))
    if not path.is_file():
        raise InputError("image file not found", file=str(path), field=field)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"not a readable image ({type(exc).__name__})", file=str(path), field=field) from None


def pixel_values(model, token_ids: Sequence[int]) -> torch.Tensor:
    """Preprocessed images for placeholder ids, ``[n_images, 3, H, W]`` in the model's dtype.

    Raises:
        InputError: the model has no image processor, or an image cannot be read.
    """
    proc = getattr(model, "processor", None)
    improc = getattr(proc, "image_processor", None) if proc is not None else None
    if improc is None:
        raise InputError(f"{model.name} is a text-only model: it cannot take an image", field="image")
    out = []
    for tid in token_ids:
        k = PLACEHOLDER_BASE - tid
        key = (k, id(improc))
        px = _pixels.get(key)
        if px is None:
            img = open_image(_images[k])
            px = improc(images=[img], return_tensors="pt")["pixel_values"][0]
            with _lock:
                _pixels[key] = px
        out.append(px)
    return torch.stack(out).to(device=model.device, dtype=model.dtype)


def clear_cache() -> None:
    """Forget preprocessed pixels (placeholder ids stay valid)."""
    with _lock:
        _pixels.clear()


def image_token_count(model) -> int:
    """How many image tokens one image becomes in ``model``'s language-model sequence.

    Asked of the processor once (one processor call on a blank image) and cached on the model.

    Raises:
        InputError: the model is text-only.
    """
    n = getattr(model, "_image_seq_len", None)
    if n:
        return n
    proc = getattr(model, "processor", None)
    tid = image_token_id(model)
    if proc is None:
        raise InputError(f"{model.name} is a text-only model: it cannot take an image", field="image")
    from PIL import Image

    size = _processor_size(proc)
    enc = proc(text=[IMAGE_TOKEN], images=[Image.new("RGB", (size, size))], return_tensors="pt")
    n = int((enc["input_ids"][0] == tid).sum())
    if n < 1:
        raise InputError(f"{model.name}: its processor produced no image tokens", field="image")
    model._image_seq_len = n
    return n


def _processor_size(proc) -> int:
    ip = getattr(proc, "image_processor", None)
    crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    if isinstance(crop, dict):
        for key in ("height", "shortest_edge", "width"):
            if key in crop:
                return int(crop[key])
    return 224


def image_token_id(model) -> int:
    """The language model's image token id (``config.image_token_id``).

    Raises:
        InputError: the model is text-only.
    """
    if not is_multimodal(model):
        raise InputError(f"{model.name} is a text-only model: it cannot take an image", field="image")
    return int(_config_image_token_id(model))


def _config_image_token_id(model) -> int | None:
    cfg = model.hf.config
    tid = getattr(cfg, "image_token_id", None)
    return getattr(cfg, "image_token_index", None) if tid is None else tid


def is_multimodal(model) -> bool:
    """Whether ``model`` takes images (a LLaVA-style model with a processor). Cheap: called on
    every encode."""
    return getattr(model, "processor", None) is not None and _config_image_token_id(model) is not None


def tokenize_image_prompt(tokenizer, prompt: ImagePrompt) -> list[int]:
    """Token ids of an image prompt, its image as one placeholder id.

    Raises:
        InputError: the tokenizer has no image token (a text-only model), or the text holds more
            than one image placeholder.
    """
    text = prompt.text
    if text.count(IMAGE_TOKEN) != 1:
        raise InputError(f"a prompt may hold one {IMAGE_TOKEN} placeholder, found {text.count(IMAGE_TOKEN)}",
                         field="prompt")
    tid = _tokenizer_image_id(tokenizer)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if ids.count(tid) != 1:
        raise InputError("the tokenizer did not keep the image placeholder as one token", field="prompt")
    ph = placeholder_id(prompt.image)
    return [ph if t == tid else t for t in ids]


def _tokenizer_image_id(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(tid, int) or tid < 0 or (unk is not None and tid == unk):
        raise InputError("an image prompt was given to a text-only model (its tokenizer has no "
                         f"{IMAGE_TOKEN} token)", field="image")
    return tid


def expanded_position(model, row: Sequence[int], pos: int) -> int:
    """Position ``pos`` of an unexpanded token row (images as placeholders) in the expanded
    sequence: shifted by ``image_token_count - 1`` per image placeholder before it."""
    n_before = sum(1 for t in row[:pos] if is_placeholder(t))
    return pos + n_before * (image_token_count(model) - 1) if n_before else pos


def expand_rows(model, rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], torch.Tensor | None]:
    """Expand placeholder ids into the model's image tokens.

    Returns:
        ``(rows, pixel_values)``: the expanded id rows, and ``[n_images, 3, H, W]`` in row-major
        order of appearance (the order LLaVA scatters image features), or None without images.

    Raises:
        InputError: a placeholder on a text-only model.
    """
    if not any(is_placeholder(t) for r in rows for t in r):
        return [list(r) for r in rows], None
    found: list[int] = []
    tid = image_token_id(model)
    n = image_token_count(model)
    out = []
    for r in rows:
        row: list[int] = []
        for t in r:
            if is_placeholder(t):
                found.append(int(t))
                row.extend([tid] * n)
            else:
                row.append(int(t))
        out.append(row)
    return out, pixel_values(model, found)


def attach_images(model, facts):
    """Facts ready for ``model``: on a multimodal model, each image fact's prompt, paraphrases and
    image-bearing neighbourhood prompts become :class:`ImagePrompt` s (text-only facts stay text:
    text-only attacks run on them); on a text-only model, image facts are refused.

    Raises:
        InputError: an image fact on a text-only model (naming the fact's file, line and the
            ``image`` field).
    """
    import dataclasses

    multimodal = is_multimodal(model)
    out = []
    for f in facts:
        img = getattr(f, "image", None)
        neigh_imgs = [n.get("image") for n in getattr(f, "neighborhood", []) if n.get("image")]
        if not multimodal:
            if img or neigh_imgs:
                file, line = f.where()
                raise InputError(f"fact {f.id!r} has an image but {model.name} is a text-only model; use a "
                                 "multimodal model (--model mini-vlm or a LLaVA directory)",
                                 file=file, line=line, field="image")
            out.append(f)
            continue
        if not img and not neigh_imgs:
            out.append(f)
            continue
        wrap = (lambda t: t if isinstance(t, ImagePrompt) else ImagePrompt(t, img)) if img else (lambda t: t)
        neigh = [dict(n, prompt=n["prompt"] if isinstance(n["prompt"], ImagePrompt) or not n.get("image")
                      else ImagePrompt(n["prompt"], n["image"])) for n in f.neighborhood]
        out.append(dataclasses.replace(f, prompt=wrap(f.prompt), paraphrases=[wrap(p) for p in f.paraphrases],
                                       neighborhood=neigh))
    return out


def text_form(fact) -> str | None:
    """The text-only form of an image fact (its ``text_prompt`` naming the entity, else the
    prompt's text without the image), or None for a text fact."""
    if not isinstance(fact.prompt, ImagePrompt):
        return None
    return getattr(fact, "text_prompt", None) or plain_text(fact.prompt)
