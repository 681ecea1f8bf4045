"""Procedurally drawn national flags and fast image augmentations (PIL + numpy only).

A small synthetic vision data set for the multimodal (LLaVA) experiments: every country in
:data:`COUNTRIES` has a flag that can be drawn from simple shapes (bands, crosses, discs, stars,
polygons) and a few facts a small language model knows about it (capital, language, continent,
currency).  The flags are simplified but recognisable, and pairwise distinct in pixels.

- :func:`draw_flag` -> a clean ``RGB`` :class:`PIL.Image.Image` of ``width x height`` pixels
  (default 96 x 64, i.e. the 3:2 aspect every flag here is drawn at), deterministic.
- :func:`render` -> ``uint8`` array ``[size, size, 3]``: the flag augmented (colour jitter, scale,
  translation, rotation, shear, waving, occluders, blur, noise -- by :data:`STRENGTHS`) and placed
  on a square canvas.  Deterministic given the state of the ``numpy.random.Generator``.
- :func:`render_image` -> the same as a PIL image, seeded by an ``int``.

Augmentations never flip an image horizontally (or vertically): mirror-image flags, e.g. a
green-white-orange and an orange-white-green tricolour, are different countries.

Speed: the clean flag is cached per (name, width, height) and the whole geometry (affine map plus
the "waving" of ``hard``) is one inverse mapping sampled bilinearly in numpy, so one image costs
well under a millisecond at ``size=64`` (see ``tests/unit/probe/vlm/test_flags.py`` and the module's
``__main__`` for a timing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["Country", "COUNTRIES", "STRENGTHS", "country", "draw_flag", "render", "render_image"]

STRENGTHS = ("easy", "medium", "hard")

_SUPERSAMPLE = 4  # flags are drawn at 4x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class Country:
    """One country and the facts the experiments ask a language model about.

    Every field is the plain word(s) a model completes, e.g. ``"The capital of France is"`` ->
    ``capital="Paris"``; ``currency`` is the currency's common name without the country
    (``"Euro"``, ``"Yen"``, ``"Pound"``, ``"Dollar"``, ...).
    """

    name: str
    capital: str
    language: str
    continent: str
    currency: str


# ----------------------------------------------------------------------------------------------
# drawing primitives
# ----------------------------------------------------------------------------------------------

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)


class _Painter:
    """Draws on a supersampled RGB image in *flag coordinates*.

    Positions ``(u, v)`` are fractions of the flag's width and height (``(0, 0)`` = top-left of the
    hoist, ``(1, 1)`` = bottom-right); radii and widths of isotropic shapes (discs, stars, crosses of
    a given thickness) are fractions of the flag's *height*, so a disc stays round at any aspect.
    """

    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.img = Image.new("RGB", (width, height), background)
        self.draw = ImageDraw.Draw(self.img)
        self.W, self.H = width, height

    # coordinate helpers -----------------------------------------------------------------------
    def xy(self, u: float, v: float) -> tuple[float, float]:
        return u * self.W, v * self.H

    # shapes -------------------------------------------------------------------------------------
    def rect(self, u0: float, v0: float, u1: float, v1: float, col: Color) -> None:
        """Axis-aligned rectangle between fractional corners (inclusive of partial pixels)."""
        x0, y0 = self.xy(u0, v0)
        x1, y1 = self.xy(u1, v1)
        self.draw.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=col)

    def crect(self, u: float, v: float, half_w: float, half_h: float, col: Color) -> None:
        """Rectangle centred at ``(u, v)`` with half sizes in units of the flag height."""
        x, y = self.xy(u, v)
        hw, hh = half_w * self.H, half_h * self.H
        self.draw.rectangle([round(x - hw), round(y - hh), round(x + hw) - 1, round(y + hh) - 1], fill=col)

    def hbands(self, cols: list[Color], weights: list[float] | None = None) -> None:
        """Horizontal stripes top to bottom, heights proportional to ``weights``."""
        weights = weights or [1.0] * len(cols)
        edges = np.concatenate([[0.0], np.cumsum(weights)]) / sum(weights)
        for col, v0, v1 in zip(cols, edges[:-1], edges[1:]):
            self.rect(0, v0, 1, v1, col)

    def vbands(self, cols: list[Color], weights: list[float] | None = None) -> None:
        """Vertical stripes hoist to fly, widths proportional to ``weights``."""
        weights = weights or [1.0] * len(cols)
        edges = np.concatenate([[0.0], np.cumsum(weights)]) / sum(weights)
        for col, u0, u1 in zip(cols, edges[:-1], edges[1:]):
            self.rect(u0, 0, u1, 1, col)

    def stripes(self, n: int, first: Color, second: Color) -> None:
        """``n`` equal horizontal stripes alternating ``first``/``second``."""
        self.hbands([first if i % 2 == 0 else second for i in range(n)])

    def disc(self, u: float, v: float, r: float, col: Color) -> None:
        self.ellipse(u, v, r, r, col)

    def ellipse(self, u: float, v: float, rx: float, ry: float, col: Color) -> None:
        """Ellipse centred at ``(u, v)``, radii in units of the flag height."""
        x, y = self.xy(u, v)
        self.draw.ellipse([x - rx * self.H, y - ry * self.H, x + rx * self.H, y + ry * self.H], fill=col)

    def poly(self, pts: list[tuple[float, float]], col: Color) -> None:
        """Polygon with fractional ``(u, v)`` vertices."""
        self.draw.polygon([self.xy(u, v) for u, v in pts], fill=col)

    def shape(self, u: float, v: float, r: float, pts: list[tuple[float, float]], col: Color) -> None:
        """Polygon given in a local unit frame (y down), centred at ``(u, v)`` and scaled by ``r``."""
        x, y = self.xy(u, v)
        self.draw.polygon([(x + px * r * self.H, y + py * r * self.H) for px, py in pts], fill=col)

    def star(self, u: float, v: float, r: float, col: Color, points: int = 5,
             inner: float = 0.382, rot: float = 0.0) -> None:
        """Star with ``points`` tips of outer radius ``r`` (flag heights); one tip up at ``rot=0``."""
        x, y = self.xy(u, v)
        pts = []
        for k in range(2 * points):
            a = math.radians(rot) - math.pi / 2 + k * math.pi / points
            rr = r * self.H * (1.0 if k % 2 == 0 else inner)
            pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        self.draw.polygon(pts, fill=col)

    def crescent(self, u: float, v: float, r: float, col: Color, du: float, dv: float,
                 r_inner: float) -> None:
        """Disc of radius ``r`` at ``(u, v)`` minus a disc of radius ``r_inner`` shifted by
        ``(du, dv)`` (all in flag heights), filled with ``col`` over whatever is below."""
        mask = Image.new("L", self.img.size, 0)
        md = ImageDraw.Draw(mask)
        x, y = self.xy(u, v)
        R, ri = r * self.H, r_inner * self.H
        md.ellipse([x - R, y - R, x + R, y + R], fill=255)
        x, y = x + du * self.H, y + dv * self.H
        md.ellipse([x - ri, y - ri, x + ri, y + ri], fill=0)
        self.img.paste(col, (0, 0), mask)

    def band(self, u0: float, v0: float, u1: float, v1: float, width: float, col: Color) -> None:
        """Straight band of thickness ``width`` (flag heights) from ``(u0, v0)`` to ``(u1, v1)``,
        extended past both ends so diagonals reach the corners."""
        (x0, y0), (x1, y1) = self.xy(u0, v0), self.xy(u1, v1)
        length = math.hypot(x1 - x0, y1 - y0)
        dx, dy = (x1 - x0) / length, (y1 - y0) / length
        nx, ny = -dy * width * self.H / 2, dx * width * self.H / 2
        ext = width * self.H
        a = (x0 - dx * ext, y0 - dy * ext)
        b = (x1 + dx * ext, y1 + dy * ext)
        self.draw.polygon([(a[0] + nx, a[1] + ny), (b[0] + nx, b[1] + ny),
                           (b[0] - nx, b[1] - ny), (a[0] - nx, a[1] - ny)], fill=col)

    def paste(self, other: "_Painter", u: float, v: float) -> None:
        """Paste another painter's image with its top-left corner at ``(u, v)``."""
        x, y = self.xy(u, v)
        self.img.paste(other.img, (round(x), round(y)))

    def sub(self, u0: float, v0: float, u1: float, v1: float, background: Color = WHITE) -> "_Painter":
        """A new painter the size of the ``[u0, u1] x [v0, v1]`` box (e.g. a canton); paste it back."""
        return _Painter(round((u1 - u0) * self.W), round((v1 - v0) * self.H), background)


# ----------------------------------------------------------------------------------------------
# flag recipes (colours are approximations of the official ones)
# ----------------------------------------------------------------------------------------------

RED: Color = (206, 17, 38)
GOLD: Color = (252, 209, 22)
UK_BLUE: Color = (1, 33, 105)
UK_RED: Color = (200, 16, 46)


def _union_jack(p: _Painter) -> None:
    p.rect(0, 0, 1, 1, UK_BLUE)
    p.band(0, 0, 1, 1, 0.2, WHITE)
    p.band(0, 1, 1, 0, 0.2, WHITE)
    p.band(0, 0, 1, 1, 0.07, UK_RED)
    p.band(0, 1, 1, 0, 0.07, UK_RED)
    p.crect(0.5, 0.5, 10.0, 1 / 6, WHITE)
    p.crect(0.5, 0.5, 1 / 6, 10.0, WHITE)
    p.crect(0.5, 0.5, 10.0, 0.1, UK_RED)
    p.crect(0.5, 0.5, 0.1, 10.0, UK_RED)


def _with_jack_canton(p: _Painter) -> None:
    p.rect(0, 0, 1, 1, UK_BLUE)
    canton = p.sub(0, 0, 0.5, 0.5)
    _union_jack(canton)
    p.paste(canton, 0, 0)


_MAPLE = [(0.0, -1.0), (0.2, -0.62), (0.42, -0.74), (0.32, -0.18), (0.62, -0.5), (0.7, -0.34),
          (1.0, -0.42), (0.88, -0.08), (1.0, 0.02), (0.54, 0.36), (0.62, 0.54), (0.07, 0.44),
          (0.07, 0.95), (-0.07, 0.95), (-0.07, 0.44), (-0.62, 0.54), (-0.54, 0.36), (-1.0, 0.02),
          (-0.88, -0.08), (-1.0, -0.42), (-0.7, -0.34), (-0.62, -0.5), (-0.32, -0.18),
          (-0.42, -0.74), (-0.2, -0.62)]


def _usa(p):
    p.stripes(13, (178, 34, 52), WHITE)
    p.rect(0, 0, 0.4, 7 / 13, (60, 59, 110))
    for i in range(5):
        for j in range(6 if i % 2 == 0 else 5):
            p.star(0.033 + j * 0.066 + (0.033 if i % 2 else 0), 0.06 + i * 0.105, 0.035, WHITE)


def _uk(p):
    _union_jack(p)


def _australia(p):
    _with_jack_canton(p)
    p.star(0.25, 0.75, 0.14, WHITE, points=7, inner=0.45)
    for u, v, r in [(0.75, 0.84, 0.07), (0.61, 0.43, 0.07), (0.75, 0.16, 0.07), (0.88, 0.38, 0.07),
                    (0.82, 0.56, 0.04)]:
        p.star(u, v, r, WHITE, points=7, inner=0.45)


def _new_zealand(p):
    _with_jack_canton(p)
    for u, v, r in [(0.75, 0.2, 0.085), (0.87, 0.43, 0.08), (0.64, 0.48, 0.085), (0.75, 0.82, 0.095)]:
        p.star(u, v, r * 1.3, WHITE)
        p.star(u, v, r, UK_RED)


def _canada(p):
    p.vbands([(216, 6, 33), WHITE, (216, 6, 33)], [1, 2, 1])
    p.shape(0.5, 0.52, 0.36, _MAPLE, (216, 6, 33))


def _greece(p):
    blue = (13, 94, 175)
    p.stripes(9, blue, WHITE)
    cu = (5 / 9) * p.H / p.W  # square canton, 5 stripes tall
    p.rect(0, 0, cu, 5 / 9, blue)
    p.rect(0, 2 / 9, cu, 3 / 9, WHITE)
    p.rect(cu * 2 / 5, 0, cu * 3 / 5, 5 / 9, WHITE)


def _switzerland(p):
    p.rect(0, 0, 1, 1, (218, 41, 28))
    p.crect(0.5, 0.5, 0.32, 0.1, WHITE)
    p.crect(0.5, 0.5, 0.1, 0.32, WHITE)


def _turkey(p):
    red = (227, 10, 23)
    p.rect(0, 0, 1, 1, red)
    p.crescent(0.5 / 1.5, 0.5, 0.25, WHITE, 0.0625, 0, 0.2)
    p.star(0.82 / 1.5, 0.5, 0.125, WHITE, rot=-90)


def _japan(p):
    p.rect(0, 0, 1, 1, WHITE)
    p.disc(0.5, 0.5, 0.3, (188, 0, 45))


def _bangladesh(p):
    p.rect(0, 0, 1, 1, (0, 106, 78))
    p.disc(0.45, 0.5, 0.3, (244, 42, 65))


def _china(p):
    p.rect(0, 0, 1, 1, (238, 28, 37))
    yellow = (255, 255, 0)
    p.star(5 / 30, 5 / 20, 3 / 20, yellow)
    for x, y in [(10, 2), (12, 4), (12, 7), (10, 9)]:
        p.star(x / 30, y / 20, 1 / 20, yellow, rot=math.degrees(math.atan2(5 - y, 5 - x)) + 90)


def _vietnam(p):
    p.rect(0, 0, 1, 1, (218, 37, 29))
    p.star(0.5, 0.5, 0.3, (255, 255, 0))


def _south_korea(p):
    red, blue = (205, 46, 58), (0, 71, 160)
    p.rect(0, 0, 1, 1, WHITE)
    # taegeuk: red upper half, blue lower half, with the two small discs making the S-curve
    x, y = p.xy(0.5, 0.5)
    r = 0.25 * p.H
    p.draw.pieslice([x - r, y - r, x + r, y + r], 180, 360, fill=red)
    p.draw.pieslice([x - r, y - r, x + r, y + r], 0, 180, fill=blue)
    p.disc(0.5 - 0.125 / 1.5, 0.5, 0.125, red)
    p.disc(0.5 + 0.125 / 1.5, 0.5, 0.125, blue)
    # four black trigrams along the diagonals
    for su, sv in [(-1, -1), (1, -1), (-1, 1), (1, 1)]:
        cu, cv = 0.5 + su * 0.3, 0.5 + sv * 0.3
        ang = math.atan2(sv * p.H, su * p.W)  # direction of the diagonal in pixels
        ax, ay = math.cos(ang), math.sin(ang)      # along the diagonal
        nx, ny = -ay, ax                           # bar direction
        cx, cy = p.xy(cu, cv)
        for k in (-1, 0, 1):
            bx, by = cx + ax * k * 0.05 * p.H, cy + ay * k * 0.05 * p.H
            hl, hw = 0.12 * p.H, 0.016 * p.H
            p.draw.polygon([(bx + nx * hl + ax * hw, by + ny * hl + ay * hw),
                            (bx - nx * hl + ax * hw, by - ny * hl + ay * hw),
                            (bx - nx * hl - ax * hw, by - ny * hl - ay * hw),
                            (bx + nx * hl - ax * hw, by + ny * hl - ay * hw)], fill=BLACK)


def _india(p):
    navy = (0, 0, 128)
    p.hbands([(255, 153, 51), WHITE, (19, 136, 8)])
    p.disc(0.5, 0.5, 0.14, navy)
    p.disc(0.5, 0.5, 0.115, WHITE)
    x, y = p.xy(0.5, 0.5)
    r = 0.12 * p.H
    for k in range(12):
        a = k * math.pi / 12
        p.draw.line([(x - r * math.cos(a), y - r * math.sin(a)), (x + r * math.cos(a), y + r * math.sin(a))],
                    fill=navy, width=max(1, round(0.012 * p.H)))
    p.disc(0.5, 0.5, 0.03, navy)


def _brazil(p):
    p.rect(0, 0, 1, 1, (0, 156, 59))
    p.poly([(0.085, 0.5), (0.5, 0.12), (0.915, 0.5), (0.5, 0.88)], (255, 223, 0))
    blue = (0, 39, 118)
    p.disc(0.5, 0.5, 0.25, blue)
    # white band: an arc of a larger circle, kept inside the blue disc
    cx, cy = p.xy(0.5, 0.5)
    R, r = 0.25 * p.H, 0.5 * p.H
    ox, oy = cx - 0.1 * p.H, cy + 0.45 * p.H
    pts = []
    for k in range(60):
        a = math.pi + k * math.pi / 59
        px, py = ox + r * math.cos(a), oy + r * math.sin(a)
        if math.hypot(px - cx, py - cy) < R * 0.93:
            pts.append((px, py))
    p.draw.line(pts, fill=WHITE, width=round(0.05 * p.H))
    for u, v in [(0.47, 0.62), (0.55, 0.66), (0.52, 0.58), (0.43, 0.57), (0.58, 0.57)]:
        p.disc(u, v, 0.012, WHITE)


def _argentina(p):
    p.hbands([(116, 172, 223), WHITE, (116, 172, 223)])
    p.star(0.5, 0.5, 0.13, (246, 180, 14), points=16, inner=0.6)
    p.disc(0.5, 0.5, 0.07, (246, 180, 14))


def _uruguay(p):
    blue = (0, 56, 168)
    p.stripes(9, WHITE, blue)
    p.rect(0, 0, 0.25, 5 / 9, WHITE)  # canton: 4 stripes tall
    p.star(0.17, 5 / 18, 0.17, (252, 209, 22), points=16, inner=0.6)
    p.disc(0.17, 5 / 18, 0.09, (252, 209, 22))


def _mexico(p):
    p.vbands([(0, 104, 71), WHITE, RED])
    p.ellipse(0.5, 0.47, 0.1, 0.13, (133, 90, 40))
    p.disc(0.5, 0.36, 0.04, (133, 90, 40))
    x, y = p.xy(0.5, 0.5)
    r = 0.17 * p.H
    p.draw.arc([x - r, y - r, x + r, y + r], 20, 160, fill=(0, 104, 71), width=round(0.04 * p.H))


def _cuba(p):
    p.stripes(5, (0, 42, 143), WHITE)
    apex = 0.866 * p.H / p.W
    p.poly([(0, 0), (apex, 0.5), (0, 1)], (203, 21, 21))
    p.star(apex / 3, 0.5, 0.12, WHITE)


def _jamaica(p):
    p.rect(0, 0, 1, 1, (0, 155, 58))
    p.poly([(0, 0), (0.5, 0.5), (0, 1)], BLACK)
    p.poly([(1, 0), (0.5, 0.5), (1, 1)], BLACK)
    p.band(0, 0, 1, 1, 0.16, (254, 209, 0))
    p.band(0, 1, 1, 0, 0.16, (254, 209, 0))


def _chile(p):
    p.hbands([WHITE, (213, 43, 30)])
    p.rect(0, 0, 1 / 3, 0.5, (0, 57, 166))
    p.star(1 / 6, 0.25, 0.13, WHITE)


def _venezuela(p):
    p.hbands([(255, 204, 0), (0, 36, 125), (207, 20, 43)])
    for k in range(8):
        a = math.radians(160 - k * 140 / 7)
        p.star(0.5 + 0.28 * math.cos(a) / 1.5, 0.66 - 0.28 * math.sin(a), 0.04, WHITE)


def _colombia(p):  # yellow half, blue and red quarters
    p.hbands([(252, 209, 22), (0, 56, 147), RED], [2, 1, 1])


def _portugal(p):
    p.vbands([(0, 102, 0), (255, 0, 0)], [2, 3])
    p.disc(0.4, 0.5, 0.22, (255, 225, 0))
    p.disc(0.4, 0.5, 0.17, (255, 0, 0))
    p.crect(0.4, 0.5, 0.1, 0.12, WHITE)
    p.crect(0.4, 0.5, 0.04, 0.06, (0, 40, 150))


def _spain(p):
    red = (170, 21, 27)
    p.hbands([red, (241, 191, 0), red], [1, 2, 1])
    p.crect(0.3, 0.5, 0.07, 0.12, red)
    p.crect(0.3, 0.37, 0.06, 0.025, (200, 150, 0))


def _czech(p):
    p.hbands([WHITE, (215, 20, 26)])
    p.poly([(0, 0), (0.5, 0.5), (0, 1)], (17, 69, 126))


def _philippines(p):
    p.hbands([(0, 56, 168), RED])
    apex = 0.866 * p.H / p.W
    p.poly([(0, 0), (apex, 0.5), (0, 1)], WHITE)
    yellow = (252, 209, 22)
    p.star(apex / 3, 0.5, 0.1, yellow, points=8, inner=0.5)
    for u, v in [(0.06, 0.1), (0.06, 0.9), (apex - 0.07, 0.5)]:
        p.star(u, v, 0.045, yellow)


def _pakistan(p):
    green = (1, 65, 28)
    p.vbands([WHITE, green], [1, 3])
    p.crescent(0.62, 0.55, 0.3, WHITE, 0.07, -0.06, 0.27)
    p.star(0.71, 0.36, 0.09, WHITE, rot=20)


def _iran(p):
    red = (218, 0, 0)
    p.hbands([(35, 159, 64), WHITE, red])
    p.ellipse(0.5, 0.5, 0.055, 0.13, red)
    p.ellipse(0.5, 0.5, 0.025, 0.09, WHITE)
    p.crect(0.5, 0.5, 0.008, 0.11, red)


def _egypt(p):
    p.hbands([RED, WHITE, BLACK])
    gold = (192, 147, 0)
    p.poly([(0.44, 0.4), (0.56, 0.4), (0.54, 0.62), (0.46, 0.62)], gold)
    p.disc(0.5, 0.38, 0.05, gold)


def _syria(p):
    p.hbands([RED, WHITE, BLACK])
    for u in (1 / 3, 2 / 3):
        p.star(u, 0.5, 0.13, (0, 122, 61))


def _libya(p):
    p.hbands([(231, 0, 19), BLACK, (35, 158, 70)], [1, 2, 1])
    p.crescent(0.48, 0.5, 0.15, WHITE, 0.035, 0, 0.12)
    p.star(0.56, 0.5, 0.06, WHITE, rot=-90)


def _malaysia(p):
    p.stripes(14, (204, 0, 1), WHITE)
    blue = (1, 0, 102)
    p.rect(0, 0, 0.5, 8 / 14, blue)
    yellow = (255, 204, 0)
    p.crescent(0.17, 4 / 14, 0.2, yellow, 0.05, 0, 0.17)
    p.star(0.31, 4 / 14, 0.12, yellow, points=14, inner=0.45)


def _nepal(p):
    blue, crimson = (0, 56, 147), (220, 20, 60)
    p.rect(0, 0, 1, 1, WHITE)
    outer = [(0.12, 0.02), (0.78, 0.47), (0.36, 0.47), (0.78, 0.98), (0.12, 0.98)]
    inner = [(0.15, 0.07), (0.66, 0.43), (0.27, 0.43), (0.68, 0.94), (0.15, 0.94)]
    p.poly(outer, blue)
    p.poly(inner, crimson)
    p.crescent(0.28, 0.3, 0.08, WHITE, 0, -0.04, 0.07)
    p.star(0.28, 0.72, 0.1, WHITE, points=12, inner=0.6)


def _mongolia(p):
    red, blue, yellow = (196, 39, 44), (1, 87, 155), (249, 207, 2)
    p.vbands([red, blue, red])
    u = 1 / 6
    p.star(u, 0.18, 0.05, yellow, points=3, inner=0.45)
    p.disc(u, 0.29, 0.045, yellow)
    p.crescent(u, 0.37, 0.05, yellow, 0, -0.025, 0.045)
    p.crect(u, 0.46, 0.07, 0.012, yellow)
    p.crect(u, 0.7, 0.07, 0.012, yellow)
    p.disc(u, 0.58, 0.07, yellow)
    p.crect(u - 0.065 / 1.5, 0.6, 0.012, 0.18, yellow)
    p.crect(u + 0.065 / 1.5, 0.6, 0.012, 0.18, yellow)


def _saudi_arabia(p):
    p.rect(0, 0, 1, 1, (0, 108, 53))
    for k, w in enumerate([0.06, 0.1, 0.04, 0.12, 0.07, 0.09]):
        u = 0.2 + k * 0.105
        p.rect(u, 0.28, u + w * 0.8, 0.34, WHITE)
        p.rect(u + w * 0.3, 0.2, u + w * 0.3 + 0.015, 0.34, WHITE)
    p.rect(0.22, 0.42, 0.78, 0.46, WHITE)
    p.rect(0.22, 0.66, 0.74, 0.7, WHITE)  # the sword
    p.rect(0.74, 0.63, 0.76, 0.73, WHITE)


def _lebanon(p):
    p.hbands([(238, 22, 31), WHITE, (238, 22, 31)], [1, 2, 1])
    green = (0, 166, 81)
    for v, w in [(0.33, 0.07), (0.45, 0.12), (0.57, 0.17)]:
        p.poly([(0.5, v - 0.07), (0.5 + w / 1.5, v + 0.1), (0.5 - w / 1.5, v + 0.1)], green)
    p.crect(0.5, 0.7, 0.02, 0.04, green)


def _qatar(p):
    p.rect(0, 0, 1, 1, (138, 21, 56))
    pts = [(0, 0)]
    n = 9
    for k in range(n):
        pts += [(0.26, k / n), (0.36, (k + 0.5) / n)]
    pts += [(0.26, 1), (0, 1)]
    p.poly(pts, WHITE)


def _uae(p):
    p.hbands([(0, 115, 47), WHITE, BLACK])
    p.rect(0, 0, 0.25, 1, (255, 0, 0))


def _ghana(p):
    p.hbands([RED, GOLD, (0, 107, 63)])
    p.star(0.5, 0.5, 0.17, BLACK)


def _ethiopia(p):
    p.hbands([(7, 137, 48), (252, 221, 9), (218, 18, 26)])
    blue = (15, 71, 175)
    p.disc(0.5, 0.5, 0.23, blue)
    p.star(0.5, 0.5, 0.18, (252, 221, 9))
    p.star(0.5, 0.5, 0.12, blue)


def _morocco(p):
    red = (193, 39, 45)
    p.rect(0, 0, 1, 1, red)
    p.star(0.5, 0.5, 0.3, (0, 98, 51))
    p.star(0.5, 0.5, 0.22, red)


def _algeria(p):
    red = (210, 16, 52)
    p.vbands([(0, 98, 51), WHITE])
    p.crescent(0.5, 0.5, 0.25, red, 0.06, 0, 0.2)
    p.star(0.57, 0.5, 0.1, red, rot=-90)


def _tunisia(p):
    red = (231, 0, 19)
    p.rect(0, 0, 1, 1, red)
    p.disc(0.5, 0.5, 0.25, WHITE)
    p.crescent(0.49, 0.5, 0.19, red, 0.05, 0, 0.155)
    p.star(0.53, 0.5, 0.11, red, rot=-90)


def _kenya(p):
    red, green = (187, 0, 0), (0, 102, 0)
    p.hbands([BLACK, WHITE, red, WHITE, green], [6, 1, 6, 1, 6])
    p.band(0.38, 0.85, 0.62, 0.15, 0.025, WHITE)
    p.band(0.38, 0.15, 0.62, 0.85, 0.025, WHITE)
    p.ellipse(0.5, 0.5, 0.13, 0.36, BLACK)
    p.ellipse(0.5, 0.5, 0.07, 0.36, red)
    p.ellipse(0.5, 0.5, 0.03, 0.06, WHITE)


def _senegal(p):
    p.vbands([(0, 133, 63), (253, 239, 66), (227, 27, 35)])
    p.star(0.5, 0.5, 0.15, (0, 133, 63))


def _somalia(p):
    p.rect(0, 0, 1, 1, (65, 137, 221))
    p.star(0.5, 0.5, 0.3, WHITE)


def _madagascar(p):
    p.rect(0, 0, 1, 1, WHITE)
    p.rect(1 / 3, 0, 1, 0.5, (252, 61, 50))
    p.rect(1 / 3, 0.5, 1, 1, (0, 126, 58))


def _png(p):
    p.rect(0, 0, 1, 1, BLACK)
    p.poly([(0, 0), (1, 0), (1, 1)], RED)
    yellow = (252, 209, 22)
    p.ellipse(0.7, 0.3, 0.14, 0.06, yellow)
    p.poly([(0.6, 0.3), (0.52, 0.5), (0.58, 0.48), (0.68, 0.32)], yellow)
    p.disc(0.82, 0.24, 0.04, yellow)
    for u, v, r in [(0.25, 0.88, 0.07), (0.16, 0.6, 0.06), (0.25, 0.4, 0.06), (0.34, 0.62, 0.06),
                    (0.29, 0.72, 0.035)]:
        p.star(u, v, r, WHITE)


def _h(*cols, weights=None):
    return lambda p: p.hbands(list(cols), weights)


def _v(*cols, weights=None):
    return lambda p: p.vbands(list(cols), weights)


def _cross(field: Color, cross: Color, grid: tuple, inner: Color | None = None, inner_grid=None):
    """Nordic cross from the official proportions ``grid = (hoist_w, bar_w, fly_w, top_h, bar_h, bottom_h)``."""
    def draw(p):
        a, b, c, d, e, f = grid
        p.rect(0, 0, 1, 1, field)
        W, H = a + b + c, d + e + f
        p.rect(a / W, 0, (a + b) / W, 1, cross)
        p.rect(0, d / H, 1, (d + e) / H, cross)
        if inner is not None:
            ia, ib, id_, ie = inner_grid
            p.rect(ia / W, 0, (ia + ib) / W, 1, inner)
            p.rect(0, id_ / H, 1, (id_ + ie) / H, inner)
    return draw


# name, capital, language, continent, currency, recipe
_TABLE: list[tuple[str, str, str, str, str, Callable[[_Painter], None]]] = [
    # Europe
    ("France", "Paris", "French", "Europe", "Euro", _v((0, 35, 149), WHITE, (237, 41, 57))),
    ("Italy", "Rome", "Italian", "Europe", "Euro", _v((0, 146, 70), WHITE, (206, 43, 55))),
    ("Germany", "Berlin", "German", "Europe", "Euro", _h(BLACK, (221, 0, 0), (255, 206, 0))),
    ("Spain", "Madrid", "Spanish", "Europe", "Euro", _spain),
    ("United Kingdom", "London", "English", "Europe", "Pound", _uk),
    ("Netherlands", "Amsterdam", "Dutch", "Europe", "Euro", _h((174, 28, 40), WHITE, (33, 70, 139))),
    ("Russia", "Moscow", "Russian", "Europe", "Ruble", _h(WHITE, (0, 57, 166), (213, 43, 30))),
    ("Poland", "Warsaw", "Polish", "Europe", "Zloty", _h(WHITE, (220, 20, 60))),
    ("Austria", "Vienna", "German", "Europe", "Euro", _h((200, 16, 46), WHITE, (200, 16, 46))),
    ("Sweden", "Stockholm", "Swedish", "Europe", "Krona",
     _cross((0, 106, 167), (254, 204, 0), (5, 2, 9, 4, 2, 4))),
    ("Norway", "Oslo", "Norwegian", "Europe", "Krone",
     _cross((186, 12, 47), WHITE, (6, 4, 12, 6, 4, 6), (0, 32, 91), (7, 2, 7, 2))),
    ("Denmark", "Copenhagen", "Danish", "Europe", "Krone",
     _cross((198, 12, 48), WHITE, (12, 4, 21, 12, 4, 12))),
    ("Finland", "Helsinki", "Finnish", "Europe", "Euro",
     _cross(WHITE, (0, 47, 108), (5, 3, 10, 4, 3, 4))),
    ("Iceland", "Reykjavik", "Icelandic", "Europe", "Krona",
     _cross((2, 82, 156), WHITE, (7, 4, 14, 7, 4, 7), (220, 30, 53), (8, 2, 8, 2))),
    ("Switzerland", "Bern", "German", "Europe", "Franc", _switzerland),
    ("Greece", "Athens", "Greek", "Europe", "Euro", _greece),
    ("Ukraine", "Kyiv", "Ukrainian", "Europe", "Hryvnia", _h((0, 87, 183), (255, 215, 0))),
    ("Hungary", "Budapest", "Hungarian", "Europe", "Forint", _h((206, 41, 57), WHITE, (71, 112, 80))),
    ("Portugal", "Lisbon", "Portuguese", "Europe", "Euro", _portugal),
    ("Czech Republic", "Prague", "Czech", "Europe", "Koruna", _czech),
    ("Romania", "Bucharest", "Romanian", "Europe", "Leu", _v((0, 43, 127), (252, 209, 22), (206, 17, 38))),
    ("Bulgaria", "Sofia", "Bulgarian", "Europe", "Lev", _h(WHITE, (0, 150, 110), (214, 38, 18))),
    ("Lithuania", "Vilnius", "Lithuanian", "Europe", "Euro", _h((253, 185, 19), (0, 106, 68), (193, 39, 45))),
    ("Estonia", "Tallinn", "Estonian", "Europe", "Euro", _h((0, 114, 206), BLACK, WHITE)),
    # Asia
    ("Turkey", "Ankara", "Turkish", "Asia", "Lira", _turkey),
    ("Japan", "Tokyo", "Japanese", "Asia", "Yen", _japan),
    ("China", "Beijing", "Chinese", "Asia", "Yuan", _china),
    ("South Korea", "Seoul", "Korean", "Asia", "Won", _south_korea),
    ("Vietnam", "Hanoi", "Vietnamese", "Asia", "Dong", _vietnam),
    ("India", "New Delhi", "Hindi", "Asia", "Rupee", _india),
    ("Bangladesh", "Dhaka", "Bengali", "Asia", "Taka", _bangladesh),
    ("Thailand", "Bangkok", "Thai", "Asia", "Baht",
     _h((165, 25, 49), WHITE, (45, 42, 74), WHITE, (165, 25, 49), weights=[1, 1, 2, 1, 1])),
    ("Indonesia", "Jakarta", "Indonesian", "Asia", "Rupiah", _h((206, 17, 38), WHITE)),
    ("Pakistan", "Islamabad", "Urdu", "Asia", "Rupee", _pakistan),
    ("Philippines", "Manila", "Filipino", "Asia", "Peso", _philippines),
    ("Iran", "Tehran", "Persian", "Asia", "Rial", _iran),
    ("Syria", "Damascus", "Arabic", "Asia", "Pound", _syria),
    ("Malaysia", "Kuala Lumpur", "Malay", "Asia", "Ringgit", _malaysia),
    ("Nepal", "Kathmandu", "Nepali", "Asia", "Rupee", _nepal),
    ("Mongolia", "Ulaanbaatar", "Mongolian", "Asia", "Tugrik", _mongolia),
    ("Saudi Arabia", "Riyadh", "Arabic", "Asia", "Riyal", _saudi_arabia),
    ("Lebanon", "Beirut", "Arabic", "Asia", "Pound", _lebanon),
    ("Qatar", "Doha", "Arabic", "Asia", "Riyal", _qatar),
    ("United Arab Emirates", "Abu Dhabi", "Arabic", "Asia", "Dirham", _uae),
    # Africa
    ("Egypt", "Cairo", "Arabic", "Africa", "Pound", _egypt),
    ("Nigeria", "Abuja", "English", "Africa", "Naira", _v((0, 135, 81), WHITE, (0, 135, 81))),
    ("Ghana", "Accra", "English", "Africa", "Cedi", _ghana),
    ("Ethiopia", "Addis Ababa", "Amharic", "Africa", "Birr", _ethiopia),
    ("Morocco", "Rabat", "Arabic", "Africa", "Dirham", _morocco),
    ("Algeria", "Algiers", "Arabic", "Africa", "Dinar", _algeria),
    ("Tunisia", "Tunis", "Arabic", "Africa", "Dinar", _tunisia),
    ("Libya", "Tripoli", "Arabic", "Africa", "Dinar", _libya),
    ("Kenya", "Nairobi", "Swahili", "Africa", "Shilling", _kenya),
    ("Senegal", "Dakar", "French", "Africa", "Franc", _senegal),
    ("Somalia", "Mogadishu", "Somali", "Africa", "Shilling", _somalia),
    ("Madagascar", "Antananarivo", "Malagasy", "Africa", "Ariary", _madagascar),
    # North America
    ("United States", "Washington", "English", "North America", "Dollar", _usa),
    ("Canada", "Ottawa", "English", "North America", "Dollar", _canada),
    ("Mexico", "Mexico City", "Spanish", "North America", "Peso", _mexico),
    ("Cuba", "Havana", "Spanish", "North America", "Peso", _cuba),
    ("Jamaica", "Kingston", "English", "North America", "Dollar", _jamaica),
    ("Costa Rica", "San Jose", "Spanish", "North America", "Colon",
     _h((0, 43, 127), WHITE, (206, 17, 38), WHITE, (0, 43, 127), weights=[1, 1, 2, 1, 1])),
    # South America
    ("Brazil", "Brasilia", "Portuguese", "South America", "Real", _brazil),
    ("Argentina", "Buenos Aires", "Spanish", "South America", "Peso", _argentina),
    ("Colombia", "Bogota", "Spanish", "South America", "Peso", _colombia),
    ("Peru", "Lima", "Spanish", "South America", "Sol", _v((217, 16, 35), WHITE, (217, 16, 35))),
    ("Chile", "Santiago", "Spanish", "South America", "Peso", _chile),
    ("Venezuela", "Caracas", "Spanish", "South America", "Bolivar", _venezuela),
    ("Uruguay", "Montevideo", "Spanish", "South America", "Peso", _uruguay),
    # Oceania
    ("Australia", "Canberra", "English", "Oceania", "Dollar", _australia),
    ("New Zealand", "Wellington", "English", "Oceania", "Dollar", _new_zealand),
    ("Papua New Guinea", "Port Moresby", "English", "Oceania", "Kina", _png),
]

COUNTRIES: tuple[Country, ...] = tuple(Country(*row[:5]) for row in _TABLE)
"""All countries, grouped by continent; each has a drawable flag (:func:`draw_flag`)."""

_BY_NAME: dict[str, Country] = {c.name: c for c in COUNTRIES}
_RECIPES: dict[str, Callable[[_Painter], None]] = {row[0]: row[5] for row in _TABLE}


def country(name: str) -> Country:
    """The :class:`Country` called ``name`` (exact, case-sensitive display name, e.g. ``"France"``).

    Raises ``KeyError`` with the list of known names if there is none.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown country {name!r}; known countries: {', '.join(_BY_NAME)}") from None


# ----------------------------------------------------------------------------------------------
# clean flags
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _flag_array(name: str, width: int, height: int) -> np.ndarray:
    """Read-only ``uint8 [height, width, 3]`` clean flag (cached)."""
    recipe = _RECIPES[country(name).name]
    p = _Painter(width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    recipe(p)
    small = p.img.resize((width, height), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


def draw_flag(name: str, width: int = 96, height: int = 64) -> Image.Image:
    """The clean flag of country ``name`` as an ``RGB`` image of ``width x height`` pixels.

    Deterministic (drawn at 4x and box-filtered, so edges are anti-aliased).  Every flag is designed
    at 3:2; other sizes stretch it.  Raises ``KeyError`` for an unknown country.
    """
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    return Image.fromarray(_flag_array(name, int(width), int(height)).copy(), "RGB")


# ----------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=1024)
def _source(name: str, width: int, height: int) -> np.ndarray:
    """``float32 [height + 2, width + 2, 4]``: premultiplied RGB (0..255) + alpha (0..1), with a
    one-pixel transparent border so bilinear sampling fades to zero outside the flag."""
    src = np.zeros((height + 2, width + 2, 4), np.float32)
    src[1:-1, 1:-1, :3] = _flag_array(name, width, height)
    src[1:-1, 1:-1, 3] = 1.0
    src.setflags(write=False)
    return src


@lru_cache(maxsize=16)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel centres ``(x, y)``, each ``float32 [size * size]``."""
    c = np.arange(size, dtype=np.float32) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    return x.ravel(), y.ravel()


def _bilinear(src: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Sample padded ``src [h+2, w+2, C]`` at flag pixel coordinates ``sx, sy`` (0..w, 0..h; pixel
    ``i`` covers ``[i, i+1)``) -> ``[N, C]``; zero outside the flag."""
    hp, wp = src.shape[:2]
    xi = np.clip(sx + 0.5, 0.0, wp - 1.0)  # +1 for the pad, -0.5 for pixel centres
    yi = np.clip(sy + 0.5, 0.0, hp - 1.0)
    x0 = np.minimum(xi.astype(np.int32), wp - 2)
    y0 = np.minimum(yi.astype(np.int32), hp - 2)
    fx = (xi - x0)[:, None]
    fy = (yi - y0)[:, None]
    flat = src.reshape(-1, src.shape[2])
    i00 = y0 * wp + x0
    top = flat[i00] * (1 - fx) + flat[i00 + 1] * fx
    bot = flat[i00 + wp] * (1 - fx) + flat[i00 + wp + 1] * fx
    return top * (1 - fy) + bot * fy


def _blur3(img: np.ndarray) -> np.ndarray:
    """Separable ``[1, 2, 1] / 4`` blur of ``[H, W, C]`` with edge padding."""
    p = np.pad(img, ((1, 1), (0, 0), (0, 0)), mode="edge")
    img = (p[:-2] + 2 * p[1:-1] + p[2:]) * 0.25
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) * 0.25


_NOISE_SIGMA = {"easy": 3.0, "medium": 10.0, "hard": 25.0}


def _placement(rng: np.random.Generator, size: int, fw: int, fh: int, medium: bool, hard: bool):
    """Random geometry: flag-local q (output pixels, centred) -> output p = c + M q.

    Returns ``(M [2, 2], out_w, out_h, cx, cy, hx, hy)``: the linear map, the flag's output size
    (pixels), its centre and the half-extents of its bounding box (kept inside the canvas).
    """
    out_w = rng.uniform(0.75, 0.95) * size
    out_h = out_w * fh / fw * (rng.uniform(0.8, 1.25) if hard else 1.0)
    if medium:
        theta = math.radians(rng.uniform(-20.0, 20.0))
        shear = rng.uniform(-0.2, 0.2)
        cos, sin = math.cos(theta), math.sin(theta)
        m = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    else:
        m = np.eye(2)
    corners = m @ np.array([[-1, 1, 1, -1], [-1, -1, 1, 1]], dtype=np.float64) * [[out_w / 2], [out_h / 2]]
    hx, hy = np.abs(corners).max(axis=1)
    cx = rng.uniform(min(hx, size - hx), max(hx, size - hx))
    cy = rng.uniform(min(hy, size - hy), max(hy, size - hy))
    return m, out_w, out_h, cx, cy, hx, hy


def _source_coords(rng: np.random.Generator, size: int, fw: int, fh: int, m: np.ndarray, out_w: float,
                   out_h: float, cx: float, cy: float, hard: bool):
    """Source-flag coordinates ``(sx, sy)`` (float32 ``[size * size]``) of every output pixel, and
    the waving shading (``hard`` only, else None)."""
    px, py = _pixel_grid(size)
    inv = np.linalg.inv(m).astype(np.float32)
    dx, dy = px - np.float32(cx), py - np.float32(cy)
    sx = (inv[0, 0] * dx + inv[0, 1] * dy) * np.float32(fw / out_w) + np.float32(fw / 2)
    sy = (inv[1, 0] * dx + inv[1, 1] * dy) * np.float32(fh / out_h) + np.float32(fh / 2)
    shade = None
    if hard:  # waving: vertical sine displacement along the flag, with matching shading
        amp = rng.uniform(0.03, 0.08) * fh
        k = 2 * math.pi * rng.uniform(0.7, 1.5) / fw
        phase = rng.uniform(0, 2 * math.pi)
        arg = np.float32(k) * sx + np.float32(phase)
        sy = sy + np.float32(amp) * np.sin(arg)
        shade = 1.0 + np.float32(rng.uniform(0.05, 0.2)) * np.cos(arg)
    return sx, sy, shade


def _background(rng: np.random.Generator, size: int, medium: bool):
    """A random smooth colour background (``medium``: float32 ``[size * size, 3]``), else a plain
    light or dark grey level (a float32 scalar)."""
    if medium:
        k = int(rng.integers(2, 7))
        grid = rng.integers(0, 256, (k, k, 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(grid, "RGB").resize((size, size), Image.Resampling.BILINEAR),
                          dtype=np.float32).reshape(-1, 3)
    level = rng.uniform(20, 80) if rng.random() < 0.5 else rng.uniform(175, 235)
    return np.float32(level)


def _occlude(rng: np.random.Generator, img: np.ndarray, flag_area: float, size: int, cx: float, cy: float,
             hx: float, hy: float) -> None:
    """Paint 1-2 grey boxes into ``img`` (in place), each no bigger than 15 % of the visible flag
    (``flag_area``, pixels), centred inside the flag's bounding box."""
    for _ in range(int(rng.integers(1, 3))):
        area = rng.uniform(0.04, 0.15) * flag_area
        ratio = rng.uniform(0.5, 2.0)
        bw, bh = math.sqrt(area * ratio), math.sqrt(area / ratio)
        bx = rng.uniform(cx - hx, cx + hx) - bw / 2
        by = rng.uniform(cy - hy, cy + hy) - bh / 2
        x0, x1 = max(0, round(bx)), min(size, round(bx + bw))
        y0, y1 = max(0, round(by)), min(size, round(by + bh))
        if x1 > x0 and y1 > y0:
            img[y0:y1, x0:x1] = rng.uniform(60, 200)


def render(name: str, strength: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """The flag of ``name`` augmented and placed on a square canvas -> ``uint8 [size, size, 3]``.

    ``strength`` (one of :data:`STRENGTHS`):

    - ``"easy"``: flag width 0.75-0.95 of the canvas (aspect kept), random translation keeping it
      inside the canvas, +-8 % per-channel colour jitter, plain light or dark grey background,
      Gaussian pixel noise sigma 3 (in 0..255 units).
    - ``"medium"``: easy + rotation +-20 degrees, shear +-0.2, a random smooth colour background,
      a slight blur, noise sigma 10.
    - ``"hard"``: medium + aspect-ratio change (x0.8-1.25), a sine "waving" distortion with
      shading, 1-2 grey occluding boxes (each at most 15 % of the flag's area, so at most 30 % in
      all), noise sigma 25.

    Never flips the flag.  Deterministic given ``rng``'s state (which it advances).  Raises
    ``ValueError`` for an unknown strength and ``KeyError`` for an unknown country.
    """
    if strength not in STRENGTHS:
        raise ValueError(f"unknown strength {strength!r}; allowed: {', '.join(STRENGTHS)}")
    country(name)  # KeyError early, with the clear message
    size = int(size)
    medium, hard = strength in ("medium", "hard"), strength == "hard"

    fw, fh = size, max(2, round(size * 2 / 3))  # source flag near the output resolution
    src = _source(name, fw, fh)
    m, out_w, out_h, cx, cy, hx, hy = _placement(rng, size, fw, fh, medium, hard)
    sx, sy, shade = _source_coords(rng, size, fw, fh, m, out_w, out_h, cx, cy, hard)
    sampled = _bilinear(src, sx, sy)  # [N, 4] premultiplied
    rgb, alpha = sampled[:, :3], sampled[:, 3:]
    jitter = (1.0 + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
    rgb = rgb * jitter
    if shade is not None:
        rgb = rgb * shade[:, None]
    bg = _background(rng, size, medium)
    img = (bg * (1.0 - alpha) + rgb).reshape(size, size, 3)
    if hard:
        _occlude(rng, img, float(alpha.sum()), size, cx, cy, hx, hy)
    if medium:
        img += np.float32(rng.uniform(0.2, 1.0)) * (_blur3(img) - img)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(_NOISE_SIGMA[strength])
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_image(name: str, strength: str, seed: int, size: int = 64) -> Image.Image:
    """:func:`render` with ``numpy.random.default_rng(seed)``, as an ``RGB`` PIL image ``size x size``."""
    return Image.fromarray(render(name, strength, np.random.default_rng(seed), size), "RGB")


def contact_sheet(path: str, n_renders: int = 6, seed: int = 0) -> Image.Image:
    """Save (and return) a sheet of every clean flag (96 x 64) followed by one easy / medium / hard
    render (64 x 64) of the first ``n_renders`` countries -- for eyeballing the data."""
    cols, cell_w, cell_h, label_h = 8, 100, 68, 10
    n = len(COUNTRIES)
    rows = -(-n // cols) + n_renders
    sheet = Image.new("RGB", (cols * cell_w, rows * (cell_h + label_h)), (128, 128, 128))
    d = ImageDraw.Draw(sheet)
    for i, c in enumerate(COUNTRIES):
        x, y = (i % cols) * cell_w, (i // cols) * (cell_h + label_h)
        sheet.paste(draw_flag(c.name), (x + 2, y + 2))
        d.text((x + 2, y + cell_h - 2), c.name[:16], fill=(0, 0, 0))
    y0 = -(-n // cols) * (cell_h + label_h)
    for r, c in enumerate(COUNTRIES[:n_renders]):
        y = y0 + r * (cell_h + label_h)
        sheet.paste(draw_flag(c.name), (2, y + 2))
        for j, s in enumerate(STRENGTHS):
            sheet.paste(render_image(c.name, s, seed + r), ((j + 1) * cell_w + 2, y + 2))
        d.text((2, y + cell_h - 2), f"{c.name[:16]}: clean / easy / medium / hard", fill=(0, 0, 0))
    sheet.save(path)
    return sheet


if __name__ == "__main__":  # python -m probe.vlm.flags [sheet.png]: timings + contact sheet
    import sys
    import time

    for s in STRENGTHS:
        g = np.random.default_rng(0)
        names = [c.name for c in COUNTRIES]
        for nm in names:
            render(nm, s, g)  # warm the caches
        t = time.perf_counter()
        reps = 2000
        for i in range(reps):
            render(names[i % len(names)], s, g)
        print(f"{s:6s}: {(time.perf_counter() - t) / reps * 1e3:.3f} ms / image (size 64)")
    contact_sheet(sys.argv[1] if len(sys.argv) > 1 else "/tmp/flags_sheet.png")
