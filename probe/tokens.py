"""Tokenisation: left-padded batches with correct positions, and answer ids taken in context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import InputError, PromptTooLongError
from .images import (IMAGE_TOKEN, ImagePrompt, expand_rows, image_token_id, is_multimodal,
                     tokenize_image_prompt)


@dataclass
class Batch:
    """A left-padded batch of prompts.

    Attributes:
        input_ids: ``[batch, seq]`` token ids, padded on the left.
        attention_mask: ``[batch, seq]``, 1 for real tokens.
        position_ids: ``[batch, seq]``, ``cumsum(mask) - 1`` (0 at pads), so absolute-position
            models (GPT-2) give the same result batched as unbatched (nnsight issue #672).
        lengths: ``[batch]`` number of real tokens per row.
        pixel_values: ``[n_images, 3, H, W]`` for multimodal rows (images in row-major order of
            their image tokens), else None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    padding_side: str = "left"
    pixel_values: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def positions(self, positions: int | Sequence[int]) -> torch.Tensor:
        """Absolute column indices ``[batch, n_positions]`` for per-row token positions.

        ``positions`` index each row's real tokens: ``-1`` is the last prompt token, ``0`` the
        first real token (after any left padding).

        Raises:
            IndexError: a position is outside some row's real tokens.
        """
        pos = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long)
        lengths = self.lengths[:, None]
        rel = torch.where(pos[None, :] < 0, lengths + pos[None, :], pos[None, :].expand(len(self.lengths), -1))
        bad = (rel < 0) | (rel >= lengths)
        if bad.any():
            row = int(bad.any(1).nonzero()[0])
            raise IndexError(f"position(s) {list(pos.tolist())} out of range for prompt {row} "
                             f"with {int(self.lengths[row])} tokens")
        return rel + (self.seq_len - lengths) if self.padding_side == "left" else rel

    def last_index(self) -> torch.Tensor:
        """``[batch]`` column of each row's last real token (``T - 1`` under left padding,
        ``length - 1`` under right padding)."""
        return self.positions(-1)[:, 0]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.lengths)),
                     padding_side=self.padding_side,
                     pixel_values=None if self.pixel_values is None else self.pixel_values.to(device))

    def model_inputs(self) -> dict:
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        return out


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        val = getattr(tokenizer, attr, None)
        if isinstance(val, int):
            return val
    return 0


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the model reads a prompt (the tokenizer's own special tokens, e.g. a
    BOS for Gemma, none for SmolLM2). A prompt that already begins with the BOS text
    (``"<bos>The ..."``) gets one BOS, not two: the same ids as the prompt without it.

    An :class:`~probe.images.ImagePrompt` gets its image as one negative placeholder id, expanded
    into the model's image tokens by :func:`encode_ids`.

    Raises:
        InputError: an image prompt on a tokenizer without an image token (a text-only model).
    """
    if isinstance(text, ImagePrompt):
        return tokenize_image_prompt(tokenizer, text)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[_doubled_bos(tokenizer, ids):]


def _doubled_bos(tokenizer, ids: Sequence[int]) -> int:
    """1 when ``ids`` start with two BOS tokens (the tokenizer's own and the prompt's ``"<bos>"``
    text), else 0: how many leading ids :func:`tokenize` drops."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos)


def tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The ids of :func:`tokenize` and each one's character span ``[start, end)`` in ``text``.

    Spans come from the fast tokenizer's offset mapping, with the same duplicated-BOS rule as
    :func:`tokenize` (the BOS the tokenizer adds is dropped, the BOS written in the text kept with
    its span ``(0, len("<bos>"))``), so span ``k`` belongs to id ``k`` of the ids the model reads.
    Special tokens the tokenizer adds have an empty span.

    Returns:
        ``(ids, spans)``; ``spans`` is None when the tokenizer gives no offsets (a slow tokenizer)
        or only empty ones.
    """
    ids = tokenize(tokenizer, text)
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return ids, None
    raw = list(enc["input_ids"])
    drop = _doubled_bos(tokenizer, raw)
    spans = [(int(s), int(e)) for s, e in enc["offset_mapping"]][drop:]
    if raw[drop:] != ids or not any(e > s for s, e in spans):
        return ids, None
    return ids, spans


def encode(model, prompts: Sequence[str], *, check_length: bool = True, padding_side: str = "left") -> Batch:
    """Tokenise ``prompts`` into a left-padded :class:`Batch` on the model's device.

    Raises:
        InputError: an empty or whitespace-only prompt (nnsight issue #608).
        PromptTooLongError: a prompt longer than the model's context window (never truncated
            silently; pitfall R4).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt {i} is empty or whitespace-only", field="prompt")
        ids = tokenize(model.tokenizer, p)
        if not ids:
            raise InputError(f"prompt {i} tokenises to zero tokens", field="prompt")
        rows.append(ids)
    return encode_ids(model, rows, check_length=check_length, padding_side=padding_side)


def encode_ids(model, rows: Sequence[Sequence[int]], *, check_length: bool = True,
               padding_side: str = "left") -> Batch:
    """Pad token-id rows (on the left by default) into a :class:`Batch` on the model's device.

    Image placeholders (negative ids from :func:`tokenize`) are expanded into the model's image
    tokens first and the images' ``pixel_values`` attached, so every position of the batch is a
    position of the sequence the language model sees.

    Raises:
        PromptTooLongError: a row longer than the model's context window.
        InputError: an image on a text-only model, or an image token without an image.
    """
    rows, pixels = expand_rows(model, rows)
    if pixels is None and is_multimodal(model):
        tid = image_token_id(model)
        if any(tid in r for r in rows):
            raise InputError(f"a prompt holds the image placeholder {IMAGE_TOKEN} but no image was given",
                             field="prompt")
    limit = model.context_length if check_length else None
    for i, r in enumerate(rows):
        if limit is not None and len(r) > limit:
            raise PromptTooLongError(f"prompt {i} has {len(r)} tokens, more than the model's context of {limit}",
                                     field="prompt")
    T = max(len(r) for r in rows)
    pid = pad_id(model.tokenizer)
    input_ids = torch.full((len(rows), T), pid, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        input_ids[i, cols] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, cols] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    lengths = mask.sum(1)
    return Batch(input_ids, mask, position_ids, lengths, padding_side, pixels).to(model.device)


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as the model would produce it right after ``prompt``.

    The ids are taken *in context* (EasyEdit issues #390/#247): ``prompt + " " + answer`` is
    tokenised and the ids after the prompt's ids are returned, so the first id carries the
    leading space (``" Paris"``) and no BOS/EOS is inserted. If the tokenizer merges across the
    boundary (the prompt ids are not a prefix), the answer is tokenised on its own with a leading
    space and no special tokens.

    Raises:
        InputError: the answer is empty or whitespace-only.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise InputError("answer is empty or whitespace-only", field="answer")
    answer = answer.strip()
    sep = "" if prompt.endswith((" ", "\n")) else " "
    p_ids = tokenize(tokenizer, prompt)
    full = tokenize(tokenizer, prompt + sep + answer)
    if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
        ids = full[len(p_ids):]
    else:
        ids = list(tokenizer(sep + answer, add_special_tokens=False)["input_ids"])
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in ids if i not in specials] or ids
    if not ids:
        raise InputError("answer tokenises to zero tokens", field="answer")
    return ids
