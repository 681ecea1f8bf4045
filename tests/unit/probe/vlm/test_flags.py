"""probe.vlm.flags: the country table, the clean flags and the augmentations (fast, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from probe.vlm.flags import COUNTRIES, STRENGTHS, Country, country, draw_flag, render, render_image

NAMES = [c.name for c in COUNTRIES]
CONTINENTS = {"Europe", "Asia", "Africa", "North America", "South America", "Oceania"}
# flags that are clearly not left-right symmetric and whose colours stand out from a grey background
ASYMMETRIC = ["France", "Romania", "Portugal", "Senegal", "Mexico", "Czech Republic"]


def test_country_table():
    assert len(COUNTRIES) >= 48
    assert len(set(NAMES)) == len(NAMES)
    assert {c.continent for c in COUNTRIES} == CONTINENTS
    for c in COUNTRIES:
        assert isinstance(c, Country)
        for field in (c.name, c.capital, c.language, c.continent, c.currency):
            assert field and field == field.strip()
    assert country("France") == Country("France", "Paris", "French", "Europe", "Euro")
    assert country("Japan").currency == "Yen"


def test_unknown_country_raises_keyerror():
    with pytest.raises(KeyError, match="unknown country 'Atlantis'"):
        country("Atlantis")
    with pytest.raises(KeyError):
        draw_flag("Atlantis")
    with pytest.raises(KeyError):
        render("Atlantis", "easy", np.random.default_rng(0))


def test_clean_flags_are_rgb_deterministic_and_pairwise_distinct():
    flags = []
    for name in NAMES:
        img = draw_flag(name)
        assert img.mode == "RGB" and img.size == (96, 64)
        arr = np.asarray(img, dtype=np.float32)
        assert np.array_equal(arr, np.asarray(draw_flag(name), dtype=np.float32))
        flags.append(arr)
    a = np.stack(flags)  # [n, 64, 96, 3]
    dist = np.abs(a[:, None] - a[None]).mean(axis=(2, 3, 4))  # mean abs difference, 0..255 units
    np.fill_diagonal(dist, np.inf)
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    assert dist[i, j] > 8.0, f"closest flags {NAMES[i]} / {NAMES[j]}: {dist[i, j]:.2f}"


def test_draw_flag_sizes_and_copy():
    img = draw_flag("Brazil", 30, 20)
    assert img.size == (30, 20)
    img.putpixel((0, 0), (1, 2, 3))  # the returned image is the caller's own copy
    assert draw_flag("Brazil", 30, 20).getpixel((0, 0)) != (1, 2, 3)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("size", [32, 64])
def test_render_shape_dtype(strength, size):
    for name in NAMES[::7]:
        out = render(name, strength, np.random.default_rng(1), size=size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
    img = render_image("Japan", strength, seed=3, size=size)
    assert img.mode == "RGB" and img.size == (size, size)


@pytest.mark.parametrize("strength", STRENGTHS)
def test_render_deterministic_per_seed(strength):
    a = render("Canada", strength, np.random.default_rng(7))
    b = render("Canada", strength, np.random.default_rng(7))
    c = render("Canada", strength, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(np.asarray(render_image("Canada", strength, 7)), a)
    rng = np.random.default_rng(7)  # the generator advances: consecutive draws differ
    assert not np.array_equal(render("Canada", strength, rng), render("Canada", strength, rng))


def test_bad_strength_names_the_allowed_values():
    with pytest.raises(ValueError, match="easy, medium, hard"):
        render("France", "extreme", np.random.default_rng(0))
    with pytest.raises(ValueError, match="easy, medium, hard"):
        render_image("France", "Easy", 0)


def _crop_flag(img: np.ndarray) -> np.ndarray:
    """Crop an easy render (plain grey background) to the flag's bounding box, resized to 96x64."""
    img = img.astype(np.float32)
    border = np.concatenate([img[:12].reshape(-1, 3), img[-12:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.abs(img - bg).max(axis=2) > 40
    ys, xs = np.nonzero(mask)
    crop = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((96, 64), Image.Resampling.BILINEAR), np.float32)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("name", ASYMMETRIC)
def test_never_flips_horizontally(name):
    flag = np.asarray(draw_flag(name), np.float32)
    flipped = flag[:, ::-1]
    assert _corr(flag, flipped) < 0.9  # the flag really is asymmetric
    same, mirror = [], []
    for seed in range(6):
        crop = _crop_flag(render(name, "easy", np.random.default_rng(seed)))
        same.append(_corr(crop, flag))
        mirror.append(_corr(crop, flipped))
        assert same[-1] > mirror[-1], (seed, same[-1], mirror[-1])
    assert np.mean(same) > 0.8 and np.mean(same) > np.mean(mirror) + 0.3


def _best_match_distance(img: np.ndarray, name: str) -> float:
    """Mean abs difference (0..255) between ``img [64, 64, 3]`` and the clean flag, over the flag's
    footprint, minimised over axis-aligned placements (flag widths 48..61 px, every translation).
    Close to the noise level for an ``easy`` render; larger once the flag is rotated, waved, ..."""
    img = img.astype(np.float32)
    best = np.inf
    for w in range(48, 62):
        h = round(w * 2 / 3)
        flag = np.asarray(draw_flag(name, w, h), np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(img, (h, w, 3))[:, :, 0]  # [py, px, h, w, 3]
        best = min(best, float(np.abs(windows - flag).mean(axis=(2, 3, 4)).min()))
    return best


def test_harder_strength_differs_more_from_clean_flag():
    dists = {s: [] for s in STRENGTHS}
    for name in NAMES[::9]:
        for seed in range(3):
            for s in STRENGTHS:
                dists[s].append(_best_match_distance(render(name, s, np.random.default_rng(seed)), name))
    easy, medium, hard = (float(np.mean(dists[s])) for s in STRENGTHS)
    assert easy < 15 and easy < medium < hard, (easy, medium, hard)
