#!/usr/bin/env python3
"""Generate the synthetic part of the shipped calibration image set.

The calibration set in ``calibration/images/`` mixes a few public-domain / CC0 photographs
(committed as files, see ``calibration/LICENSES.md``) with synthetic images drawn here with
Pillow only: document pages, a form, a receipt, an invoice, charts, UI screenshots,
text-in-the-wild scenes and diagrams.  The mix follows roughly the SmolVLM training mix
(documents, captioning photos, charts, screenshots, scene text, tables/diagrams) so that
activation statistics collected for quantization cover the kinds of input the model sees.

Usage::

    .venv/bin/python scripts/make_calibration_images.py [--out DIR] [--only NAME ...]

Everything is deterministic: each image has its own ``random.Random`` seeded from a fixed
base seed and the image name, and all text uses Pillow's BASIC layout engine.  Byte-identical
output needs the same Pillow/FreeType/zlib and the DejaVu fonts (Debian ``fonts-dejavu-core``)
under /usr/share/fonts; without DejaVu the script falls back to Pillow's bundled scalable
default font, which yields the same layouts with a different typeface.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import zlib
from pathlib import Path
from typing import Callable

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

BASE_SEED = 20240917
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "calibration" / "images"

# --------------------------------------------------------------------------------------------
# Fonts
# --------------------------------------------------------------------------------------------

FONT_DIRS = [
    Path("/usr/share/fonts/truetype/dejavu"),
    Path("/usr/share/fonts/dejavu"),
    Path("/usr/share/fonts/TTF"),
    Path("/usr/local/share/fonts"),
]

FONT_FILES = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "sans-italic": "DejaVuSans-Oblique.ttf",
    "sans-bold-italic": "DejaVuSans-BoldOblique.ttf",
    "sans-light": "DejaVuSans-ExtraLight.ttf",
    "cond": "DejaVuSansCondensed.ttf",
    "cond-bold": "DejaVuSansCondensed-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "serif-bold": "DejaVuSerif-Bold.ttf",
    "serif-italic": "DejaVuSerif-Italic.ttf",
    "mono": "DejaVuSansMono.ttf",
    "mono-bold": "DejaVuSansMono-Bold.ttf",
}

_font_cache: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def _find_font_file(name: str) -> Path | None:
    for d in FONT_DIRS:
        p = d / name
        if p.is_file():
            return p
    return None


def font(style: str, size: int) -> ImageFont.FreeTypeFont:
    """A font of the given style and pixel size.

    ``style`` is a key of FONT_FILES (DejaVu, when installed) or ``"default"`` for Pillow's
    bundled scalable font.  Missing DejaVu files fall back to the bundled font.
    """
    size = max(6, int(round(size)))
    key = (style, size)
    if key not in _font_cache:
        path = _find_font_file(FONT_FILES[style]) if style in FONT_FILES else None
        if path is not None:
            f = ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)
        else:
            f = ImageFont.load_default(size=size)
        _font_cache[key] = f
    return _font_cache[key]


# --------------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------------


def tw(f: ImageFont.FreeTypeFont, s: str) -> float:
    """Advance width of a string."""
    return f.getlength(s)


def wrap(f: ImageFont.FreeTypeFont, text: str, width: float) -> list[str]:
    """Greedy word wrap to a pixel width."""
    lines: list[str] = []
    for para in text.split("\n"):
        words = para.split()
        cur = ""
        for w in words:
            trial = w if not cur else cur + " " + w
            if tw(f, trial) <= width or not cur:
                cur = trial
            else:
                lines.append(cur)
                cur = w
        lines.append(cur)
    return lines


def paragraph(
    d: ImageDraw.ImageDraw,
    x: float,
    y: float,
    text: str,
    f,
    width: float,
    fill="black",
    leading: float = 1.4,
    justify: bool = False,
    indent: float = 0,
) -> float:
    """Draw a wrapped paragraph; return the y just below it."""
    lh = f.size * leading
    first = True
    words = text.split()
    lines: list[list[str]] = []
    cur: list[str] = []
    for w in words:
        avail = width - (indent if not lines else 0)
        trial = " ".join(cur + [w])
        if cur and tw(f, trial) > avail:
            lines.append(cur)
            cur = [w]
        else:
            cur.append(w)
    if cur:
        lines.append(cur)
    for i, ws in enumerate(lines):
        lx = x + (indent if first else 0)
        avail = width - (indent if first else 0)
        last = i == len(lines) - 1
        if justify and not last and len(ws) > 1:
            total = sum(tw(f, w) for w in ws)
            gap = (avail - total) / (len(ws) - 1)
            cx = lx
            for w in ws:
                d.text((cx, y), w, font=f, fill=fill)
                cx += tw(f, w) + gap
        else:
            d.text((lx, y), " ".join(ws), font=f, fill=fill)
        y += lh
        first = False
    return y


def text_center(d: ImageDraw.ImageDraw, cx: float, cy: float, s: str, f, fill="black"):
    d.text((cx, cy), s, font=f, fill=fill, anchor="mm")


def text_right(d: ImageDraw.ImageDraw, rx: float, y: float, s: str, f, fill="black"):
    d.text((rx - tw(f, s), y), s, font=f, fill=fill)


def rotated_text(
    img: Image.Image, center: tuple[float, float], s: str, f, fill, angle: float
) -> None:
    """Paste text rotated by ``angle`` degrees (counter-clockwise) centred at ``center``."""
    left, t, r, b = f.getbbox(s)
    pad = 4
    tile = Image.new("RGBA", (int(r - left) + 2 * pad, int(b - t) + 2 * pad), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((pad - left, pad - t), s, font=f, fill=fill)
    tile = tile.rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    img.paste(tile, (int(center[0] - tile.width / 2), int(center[1] - tile.height / 2)), tile)


def arrow(d: ImageDraw.ImageDraw, p0, p1, fill="black", width: int = 3, head: float = 14):
    """A straight arrow from p0 to p1 with a filled head at p1."""
    x0, y0 = p0
    x1, y1 = p1
    ang = math.atan2(y1 - y0, x1 - x0)
    bx, by = x1 - head * math.cos(ang), y1 - head * math.sin(ang)
    d.line([(x0, y0), (bx, by)], fill=fill, width=width)
    left = (bx + head * 0.5 * math.sin(ang), by - head * 0.5 * math.cos(ang))
    right = (bx - head * 0.5 * math.sin(ang), by + head * 0.5 * math.cos(ang))
    d.polygon([(x1, y1), left, right], fill=fill)


def dashed_line(d: ImageDraw.ImageDraw, p0, p1, fill, width=1, dash=8, gap=6):
    x0, y0 = p0
    x1, y1 = p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    pos = 0.0
    while pos < length:
        end = min(pos + dash, length)
        d.line(
            [(x0 + ux * pos, y0 + uy * pos), (x0 + ux * end, y0 + uy * end)], fill=fill, width=width
        )
        pos = end + gap


def vgradient(size: tuple[int, int], top, bottom) -> Image.Image:
    """Vertical linear gradient, RGB."""
    w, h = size
    col = Image.new("RGB", (1, h))
    px = col.load()
    for y in range(h):
        t = y / max(1, h - 1)
        px[0, y] = tuple(int(round(a + (b - a) * t)) for a, b in zip(top, bottom))
    return col.resize((w, h), Image.Resampling.NEAREST)


def barcode(
    d: ImageDraw.ImageDraw,
    x: float,
    y: float,
    w: float,
    h: float,
    rng: random.Random,
    digits: str | None = None,
    f=None,
    fill="black",
) -> None:
    """A plausible-looking (not decodable) 1-D barcode with human-readable digits below."""
    modules: list[int] = [1, 0, 1, 0]  # start guard
    bar = 1
    for i in range(58):  # alternating bars and spaces, 1-3 modules wide
        if i == 29:
            modules += [0, 1, 0, 1, 0]  # centre guard
            bar = 1
        modules += [bar] * rng.choice([1, 1, 2, 3])
        bar = 1 - bar
    modules += [0, 1, 0, 1]  # end guard
    mw = w / len(modules)
    for i, m in enumerate(modules):
        if m:
            d.rectangle([x + i * mw, y, x + (i + 1) * mw - 0.01, y + h], fill=fill)
    if digits and f is not None:
        text_center(d, x + w / 2, y + h + f.size * 0.75, digits, f, fill=fill)


def save_png(img: Image.Image, path: Path, colors: int | None = None) -> None:
    """Save an optimized PNG; optionally quantize to a palette (no dithering)."""
    if colors:
        img = img.convert("RGB").quantize(
            colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    img.save(path, format="PNG", optimize=True)


# --------------------------------------------------------------------------------------------
# Text content (original prose written for this project)
# --------------------------------------------------------------------------------------------

REPORT_ABSTRACT = (
    "This report summarises the drinking water quality monitoring carried out by the "
    "Riverside Municipal Utility District between January and December 2023. A total of "
    "4,812 samples were collected from 63 sites across the distribution network and analysed "
    "for microbiological, chemical and physical parameters. All regulated parameters met the "
    "applicable limits in 99.6% of samples; the remaining exceedances were investigated and "
    "resolved within 48 hours."
)

REPORT_SECTIONS = [
    (
        "1. Introduction",
        [
            "The District supplies treated water to approximately 212,000 residents through two "
            "treatment works and 1,140 km of mains. Routine monitoring verifies that water leaving "
            "the works and water at customer taps remains safe, clear and pleasant to drink.",
            "This edition adds a section on lead service line replacement and, for the first time, "
            "reports results for the six new sampling points commissioned in the northern zone.",
        ],
    ),
    (
        "2. Sampling methods",
        [
            "Samples were taken weekly at treatment works outlets and monthly at randomly selected "
            "customer taps. Chlorine residual, turbidity and temperature were measured on site with "
            "calibrated portable meters; all other analyses were performed by the accredited "
            "laboratory within 24 hours of collection.",
            "Sampling sites are rotated each quarter so that every pressure zone is visited at "
            "least four times per year. Results below the limit of quantification are reported as "
            "half of that limit when averages are computed.",
        ],
    ),
    (
        "3. Results",
        [
            "Table 1 lists the annual summary for the main indicator parameters. Mean free chlorine "
            "at customer taps was 0.62 mg/L, slightly higher than in 2022 because of the revised "
            "dosing set-point introduced in April.",
        ],
    ),
    (
        "4. Discussion",
        [
            "Turbidity peaks coincided with the spring storm events of March 14 and May 2, when raw "
            "water turbidity at the river intake exceeded 180 NTU. Treated water remained below "
            "0.3 NTU throughout both events.",
            "Nitrate concentrations continue the slow downward trend observed since 2017, which is "
            "consistent with the catchment management programme agreed with local farmers.",
        ],
    ),
    (
        "5. Lead service lines",
        [
            "During 2023 the District replaced 1,206 lead service lines, bringing the total since the "
            "programme began to 7,940. An estimated 2,300 lines remain, most of them in the older "
            "streets around the harbour.",
        ],
    ),
    (
        "6. Next steps",
        [
            "In 2024 the District will add continuous chlorine monitors at four reservoir outlets and "
            "publish weekly results on its website.",
        ],
    ),
]
REPORT_COLUMNS = [0, 0, 1, 1, 0, 1]

BOOK_PARAGRAPHS = [
    "The road to the harbour was older than the town itself, and in places the flagstones had "
    "worn so smooth that the rain collected in shallow mirrors. Ada walked it every morning "
    "before the fishing boats came in, counting the gulls on the breakwater and listening for "
    "the bell of the channel buoy, which rang only when the swell came from the west.",
    "Her uncle had kept the light for thirty-one years. He had written the weather into a "
    "ledger twice a day, in the same narrow hand, and when the ledgers filled a shelf he had "
    "simply built another shelf. There were eleven of them now, bowed under the weight of "
    "paper, and the oldest volumes smelled of tar and lamp oil.",
    "\u201cYou read them as if they were novels,\u201d the postmistress said once, finding her on "
    "the steps with a volume open on her knees. Ada had laughed, but it was true. Each entry "
    "was a small story: wind north-north-east, force six; visibility poor; the Margaret Ann "
    "late by two hours; a seal on the slipway, unafraid.",
    "It was in the ninth ledger, on a page dated the fourth of November, that she found the "
    "line that did not belong. Between the barometer reading and the note about the tide, in "
    "ink that was darker than the rest, someone had written a single sentence: Do not light "
    "the lamp on the night the bell rings twice.",
    "She closed the book and sat for a long time watching the water. The buoy was silent. "
    "Out past the point the sea was the colour of slate, and a line of cloud lay along the "
    "horizon like a second coast.",
]

MEMO_BODY = [
    "Please be advised that the east wing of the Hamilton Building will be closed from "
    "Monday 14 October to Friday 25 October while the heating system is replaced.",
    "During this period all offices on floors 2 and 3 of the east wing will move temporarily "
    "to the conference suite in the west wing (rooms W201 to W214). Removal crates will be "
    "delivered on Thursday 10 October and must be packed and labelled by 4:00 pm on Friday "
    "11 October.",
    "Network points, telephones and printers will be transferred by the IT team over the "
    "weekend. Your extension number will not change. If you need additional equipment, "
    "please log a request on the service desk portal before 9 October.",
    "The main entrance on Carver Street will remain open. Deliveries should use the loading "
    "bay on Mill Lane. We apologise for the inconvenience and thank you for your patience.",
]


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def doc_report_page(rng: random.Random) -> Image.Image:
    W, H = 1240, 1754
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    m = 100
    # running header
    d.text(
        (m, 50), "Riverside Municipal Utility District", font=font("sans", 18), fill=(90, 90, 90)
    )
    text_right(
        d, W - m, 50, "Annual Water Quality Report 2023", font("sans-italic", 18), (90, 90, 90)
    )
    d.line([(m, 80), (W - m, 80)], fill=(30, 80, 140), width=2)

    y = 120
    d.text((m, y), "Drinking Water Quality:", font=font("serif-bold", 44), fill=(20, 45, 90))
    y += 56
    d.text((m, y), "Annual Monitoring Summary 2023", font=font("serif-bold", 44), fill=(20, 45, 90))
    y += 70
    d.text(
        (m, y),
        "Prepared by the Water Quality Section  \u00b7  Issued 28 March 2024  \u00b7  Ref. RMUD-WQ-2023",
        font=font("sans", 19),
        fill=(70, 70, 70),
    )
    y += 50
    # abstract box
    box_top = y
    fa = font("sans", 21)
    inner = W - 2 * m - 40
    lines_needed = len(wrap(fa, REPORT_ABSTRACT, inner))
    box_h = 60 + lines_needed * fa.size * 1.45 + 20
    d.rectangle([m, box_top, W - m, box_top + box_h], fill=(236, 242, 250), outline=(160, 180, 210))
    d.text((m + 20, box_top + 16), "Summary", font=font("sans-bold", 22), fill=(20, 45, 90))
    paragraph(
        d,
        m + 20,
        box_top + 52,
        REPORT_ABSTRACT,
        fa,
        inner,
        fill=(20, 20, 20),
        leading=1.45,
        justify=True,
    )
    y = box_top + box_h + 40

    # two columns
    gutter = 50
    colw = (W - 2 * m - gutter) / 2
    fb = font("serif", 20)
    fh = font("sans-bold", 24)
    cols = [m, m + colw + gutter]
    col_y = [y, y]
    for si, (title, paras) in enumerate(REPORT_SECTIONS):
        col = REPORT_COLUMNS[si]
        cy = col_y[col]
        d.text((cols[col], cy), title, font=fh, fill=(20, 45, 90))
        cy += 40
        for p in paras:
            cy = (
                paragraph(
                    d,
                    cols[col],
                    cy,
                    p,
                    fb,
                    colw,
                    fill=(25, 25, 25),
                    leading=1.5,
                    justify=True,
                    indent=24,
                )
                + 12
            )
        if title.startswith("3."):
            # Table 1 inside the column
            cy += 6
            d.text(
                (cols[col], cy),
                "Table 1. Annual summary, customer taps",
                font=font("sans-bold", 17),
                fill=(40, 40, 40),
            )
            cy += 30
            headers = ["Parameter", "Unit", "Limit", "Mean", "Max"]
            rows = [
                ["Free chlorine", "mg/L", "5.0", "0.62", "1.48"],
                ["Turbidity", "NTU", "1.0", "0.11", "0.29"],
                ["Nitrate", "mg/L", "50", "12.4", "21.7"],
                ["Lead", "\u00b5g/L", "10", "1.3", "8.9"],
                ["pH", "\u2013", "6.5\u20139.5", "7.6", "8.1"],
                ["E. coli", "/100 mL", "0", "0", "0"],
            ]
            widths = [0.32, 0.17, 0.19, 0.16, 0.16]
            ft = font("cond", 17)
            ftb = font("cond-bold", 17)
            rh = 30
            x0 = cols[col]
            d.rectangle([x0, cy, x0 + colw, cy + rh], fill=(20, 45, 90))
            cx = x0
            for j, (h_, wfrac) in enumerate(zip(headers, widths)):
                if j == 0:
                    d.text((cx + 6, cy + 5), h_, font=ftb, fill="white")
                else:
                    text_right(d, cx + wfrac * colw - 8, cy + 5, h_, ftb, "white")
                cx += wfrac * colw
            cy += rh
            for i, r in enumerate(rows):
                if i % 2:
                    d.rectangle([x0, cy, x0 + colw, cy + rh], fill=(240, 243, 248))
                cx = x0
                for j, (v, wfrac) in enumerate(zip(r, widths)):
                    if j == 0:
                        d.text((cx + 6, cy + 5), v, font=ft, fill=(20, 20, 20))
                    else:
                        text_right(d, cx + wfrac * colw - 8, cy + 5, v, ft, (20, 20, 20))
                    cx += wfrac * colw
                cy += rh
            d.line([(x0, cy), (x0 + colw, cy)], fill=(20, 45, 90), width=2)
            cy += 8
            d.text(
                (x0, cy),
                "Limits from the national drinking water standard.",
                font=font("sans-italic", 15),
                fill=(90, 90, 90),
            )
            cy += 34
        col_y[col] = cy + 14
    # footer
    d.line([(m, H - 90), (W - m, H - 90)], fill=(180, 180, 180), width=1)
    d.text((m, H - 75), "RMUD-WQ-2023 rev. B", font=font("sans", 17), fill=(110, 110, 110))
    text_center(d, W / 2, H - 64, "3", font("sans", 19), (60, 60, 60))
    text_right(
        d, W - m, H - 75, "www.rmud.example/water-quality", font("sans", 17), (110, 110, 110)
    )
    return img


def doc_book_page(rng: random.Random) -> Image.Image:
    W, H = 1000, 1500
    img = Image.new("RGB", (W, H), (252, 249, 240))
    d = ImageDraw.Draw(img)
    ml, mr = 120, 110
    ink = (30, 28, 25)
    d.text((ml, 70), "87", font=font("serif", 20), fill=ink)
    text_center(d, W / 2, 80, "T H E   S A L T   R O A D", font("serif", 17), (80, 75, 70))
    y = 200
    text_center(d, W / 2, y, "CHAPTER FOUR", font("serif", 22), (90, 80, 70))
    y += 60
    text_center(d, W / 2, y, "The Ledger", font("serif-italic", 46), ink)
    y += 60
    d.line([(W / 2 - 40, y), (W / 2 + 40, y)], fill=(150, 140, 120), width=1)
    y += 50
    fb = font("serif", 24)
    width = W - ml - mr
    # drop cap
    first = BOOK_PARAGRAPHS[0]
    cap = first[0]
    fcap = font("serif-bold", 98)
    d.text((ml, y - 8), cap, font=fcap, fill=(120, 30, 30))
    capw = tw(fcap, cap) + 10
    rest = first[1:]
    # first three lines are narrower next to the drop cap
    words = rest.split()
    lh = fb.size * 1.55
    line_no = 0
    cur: list[str] = []
    lines: list[tuple[list[str], float, float]] = []
    for w in words:
        off = capw if line_no < 3 else 0
        trial = " ".join(cur + [w])
        if cur and tw(fb, trial) > width - off:
            lines.append((cur, ml + off, width - off))
            line_no += 1
            cur = [w]
        else:
            cur.append(w)
    lines.append((cur, ml + (capw if line_no < 3 else 0), width - (capw if line_no < 3 else 0)))
    for i, (ws, lx, avail) in enumerate(lines):
        if i < len(lines) - 1 and len(ws) > 1:
            total = sum(tw(fb, w_) for w_ in ws)
            gap = (avail - total) / (len(ws) - 1)
            cx = lx
            for w_ in ws:
                d.text((cx, y), w_, font=fb, fill=ink)
                cx += tw(fb, w_) + gap
        else:
            d.text((lx, y), " ".join(ws), font=fb, fill=ink)
        y += lh
    for p in BOOK_PARAGRAPHS[1:]:
        y = paragraph(d, ml, y, p, fb, width, fill=ink, leading=1.55, justify=True, indent=40)
        if y > H - 160:
            break
    return img


def doc_form(rng: random.Random) -> Image.Image:
    W, H = 1240, 1754
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    m = 90
    dark = (25, 25, 25)
    accent = (0, 102, 84)
    pen = (20, 50, 160)
    fpen = font("sans-italic", 30)
    # header
    d.rectangle([m, 60, m + 90, 150], fill=accent)
    text_center(d, m + 45, 105, "CSC", font("sans-bold", 30), "white")
    d.text(
        (m + 115, 62), "Eastfield Community Sports Centre", font=font("sans-bold", 34), fill=dark
    )
    d.text(
        (m + 115, 108),
        "12 Orchard Way, Eastfield EF4 7QL  \u00b7  Tel. 01632 960 418",
        font=font("sans", 19),
        fill=(80, 80, 80),
    )
    d.text((m, 185), "MEMBERSHIP APPLICATION FORM", font=font("sans-bold", 30), fill=accent)
    d.text(
        (m, 228),
        "Please complete in BLOCK CAPITALS using black or blue ink. Fields marked * are required.",
        font=font("sans-italic", 18),
        fill=(80, 80, 80),
    )
    y = 275

    def section(title: str) -> None:
        nonlocal y
        d.rectangle([m, y, W - m, y + 38], fill=(225, 240, 236))
        d.text((m + 12, y + 7), title, font=font("sans-bold", 21), fill=accent)
        y += 56

    flab = font("sans", 19)

    def field(label: str, value: str, x0: float, x1: float, yy: float) -> None:
        d.text((x0, yy), label, font=flab, fill=dark)
        lx = x0 + tw(flab, label) + 12
        d.line([(lx, yy + 26), (x1, yy + 26)], fill=(120, 120, 120), width=1)
        if value:
            jitter = rng.uniform(-3, 2)
            d.text((lx + 10, yy - 10 + jitter), value, font=fpen, fill=pen)

    def boxes(label: str, value: str, n: int, x0: float, yy: float, sep_after=()) -> float:
        d.text((x0, yy), label, font=flab, fill=dark)
        bx = x0 + tw(flab, label) + 14
        for i in range(n):
            d.rectangle([bx, yy - 6, bx + 32, yy + 30], outline=(110, 110, 110), width=1)
            if i < len(value) and value[i] != " ":
                text_center(d, bx + 16, yy + 12, value[i], font("sans-italic", 24), pen)
            bx += 34
            if i in sep_after:
                d.text((bx + 2, yy), "/", font=flab, fill=dark)
                bx += 18
        return bx

    section("1.  Personal details")
    field("Surname*", "OKONKWO-HARRIS", m, W / 2 + 60, y)
    field("Title", "Ms", W / 2 + 90, W - m, y)
    y += 56
    field("Given names*", "Adaeze Margaret", m, W - m, y)
    y += 60
    boxes("Date of birth*", "14031987", 8, m, y, sep_after=(1, 3))
    d.text((W / 2 + 90, y), "Gender", font=flab, fill=dark)
    gx = W / 2 + 180
    for opt, checked in [("F", True), ("M", False), ("Other", False)]:
        d.rectangle([gx, y - 2, gx + 24, y + 22], outline=dark, width=2)
        if checked:
            d.line([(gx + 4, y + 10), (gx + 10, y + 18), (gx + 22, y - 6)], fill=pen, width=4)
        d.text((gx + 32, y), opt, font=flab, fill=dark)
        gx += 110
    y += 66
    field("Address*", "Flat 3, 27 Linden Crescent", m, W - m, y)
    y += 56
    field("Town", "Eastfield", m, W / 2 + 60, y)
    boxes("Postcode*", "EF3 9RB", 7, W / 2 + 90, y)
    y += 64
    field("Telephone", "07700 900 382", m, W / 2 + 60, y)
    field("Email", "ada.oh@mail.example", W / 2 + 90, W - m, y)
    y += 76

    section("2.  Membership type (tick one)")
    opts = [
        ("Adult (18\u201364)", "\u00a334.50 / month", True),
        ("Student (with valid ID)", "\u00a322.00 / month", False),
        ("Senior (65+)", "\u00a319.75 / month", False),
        ("Family (2 adults + up to 3 children)", "\u00a379.00 / month", False),
        ("Off-peak only (weekdays before 4 pm)", "\u00a324.00 / month", False),
    ]
    for label, price, checked in opts:
        d.rectangle([m + 10, y - 2, m + 36, y + 24], outline=dark, width=2)
        if checked:
            d.line([(m + 14, y + 10), (m + 21, y + 20), (m + 36, y - 8)], fill=pen, width=4)
        d.text((m + 52, y), label, font=flab, fill=dark)
        text_right(d, W / 2 + 200, y, price, flab, dark)
        y += 40
    y += 30

    section("3.  Payment")
    d.text((m, y), "Payment method:", font=flab, fill=dark)
    px = m + 190
    for opt, checked in [("Direct debit", True), ("Annual in advance (10% discount)", False)]:
        d.ellipse([px, y, px + 22, y + 22], outline=dark, width=2)
        if checked:
            d.ellipse([px + 5, y + 5, px + 17, y + 17], fill=pen)
        d.text((px + 32, y), opt, font=flab, fill=dark)
        px += 60 + tw(flab, opt)
    y += 56
    field("Account holder", "A M Okonkwo-Harris", m, W - m, y)
    y += 62
    bx = boxes("Sort code", "309634", 6, m, y, sep_after=(1, 3))
    boxes("Account no.", "41882907", 8, bx + 50, y)
    y += 80

    section("4.  Health and declaration")
    decl = (
        "I confirm that the information given on this form is correct and that I have read and agree "
        "to the Centre's terms of membership, including the minimum term of three months and one "
        "calendar month's notice of cancellation. I understand that I should seek medical advice "
        "before starting a new exercise programme if I have any health condition."
    )
    y = paragraph(d, m, y, decl, font("sans", 19), W - 2 * m, fill=dark, leading=1.45)
    y += 30
    d.text((m, y + 30), "Signature*", font=flab, fill=dark)
    d.line([(m + 120, y + 56), (m + 560, y + 56)], fill=(120, 120, 120), width=1)
    # a looping cursive-like signature (irregular loop sizes and spacing)
    pts = []
    sx = m + 150
    ph = 0.0
    for i in range(300):
        t = i / 299
        ph += 2 * math.pi * 6.0 / 299 * (1 + 0.7 * math.sin(9 * t + 1.0))
        amp = 8 + 22 * abs(math.sin(3.3 * t + 0.6)) * (1.6 if t < 0.12 else 1.0)
        pts.append((sx + t * 330 + 0.6 * amp * math.cos(ph), y + 38 - amp * math.sin(ph) - 14 * t))
    d.line(pts, fill=pen, width=3, joint="curve")
    d.line([(sx - 10, y + 62), (sx + 360, y + 52)], fill=pen, width=2)
    boxes("Date*", "02092024", 8, m + 620, y + 30, sep_after=(1, 3))
    y += 100

    # office use box
    d.rectangle([m, y, W - m, y + 115], outline=(120, 120, 120), width=1)
    d.rectangle([m, y, m + 236, y + 30], fill=(235, 235, 235))
    d.text((m + 10, y + 5), "FOR OFFICE USE ONLY", font=font("sans-bold", 16), fill=(90, 90, 90))
    fo = font("sans", 17)
    d.text((m + 20, y + 50), "Member no. ______________", font=fo, fill=(90, 90, 90))
    d.text((m + 380, y + 50), "ID checked \u25a1", font=fo, fill=(90, 90, 90))
    d.text((m + 600, y + 50), "Card issued \u25a1", font=fo, fill=(90, 90, 90))
    d.text((m + 20, y + 85), "Staff initials ______", font=fo, fill=(90, 90, 90))
    d.text((m + 380, y + 85), "Start date ____ / ____ / ______", font=fo, fill=(90, 90, 90))
    d.text((m, H - 50), "Form MEM-01 (rev. 06/2024)", font=font("sans", 15), fill=(120, 120, 120))
    text_right(d, W - m, H - 50, "Page 1 of 2", font("sans", 15), (120, 120, 120))
    return img


def doc_receipt(rng: random.Random) -> Image.Image:
    W, H = 560, 1430
    paper = (250, 250, 246)
    img = Image.new("RGB", (W, H), paper)
    d = ImageDraw.Draw(img)
    for yy in range(0, H, 3):  # faint thermal-paper banding
        if rng.random() < 0.04:
            d.line([(0, yy), (W, yy)], fill=(243, 243, 238))
    ink = (40, 40, 45)
    fm = font("mono", 21)
    fmb = font("mono-bold", 21)
    cw = tw(fm, "M")
    ncols = int((W - 60) // cw)
    x0 = (W - ncols * cw) / 2

    y = 40
    text_center(d, W / 2, y + 20, "GREENLEAF", font("sans-bold", 46), ink)
    y += 56
    text_center(d, W / 2, y + 12, "M A R K E T", font("sans", 22), ink)
    y += 44
    for line in ["418 Harbor Boulevard", "Port Alden, WA 98177", "(360) 555-0142", "Store #0217"]:
        text_center(d, W / 2, y + 12, line, fm, ink)
        y += 28
    y += 14

    def row(left: str, right: str = "", f=fm) -> None:
        nonlocal y
        d.text((x0, y), left, font=f, fill=ink)
        if right:
            text_right(d, x0 + ncols * cw, y, right, f, ink)
        y += 28

    def rule(ch: str = "-") -> None:
        nonlocal y
        d.text((x0, y), ch * ncols, font=fm, fill=ink)
        y += 28

    row("09/14/2024  17:42", "TRM 03")
    row("CASHIER: DANA M.", "TRX 58214")
    rule("=")
    items = [
        ("ORG BANANAS", 1.29, "2.31 lb @ 0.56/lb"),
        ("SOURDOUGH LOAF", 5.49, None),
        ("WHOLE MILK 1GAL", 4.19, None),
        ("FREE RANGE EGGS 12", 6.79, None),
        ("CHEDDAR SHARP 8OZ", 3.99, None),
        ("BABY SPINACH", 4.49, None),
        ("ROMA TOMATOES", 2.14, "1.62 lb @ 1.32/lb"),
        ("OLIVE OIL XV 500ML", 9.99, None),
        ("PASTA PENNE 1LB", 1.89, None),
        ("PASTA PENNE 1LB", 1.89, None),
        ("COFFEE BEANS 12OZ", 12.49, None),
        ("DARK CHOC 72%", 3.29, None),
        ("SPARKLING WATER 8PK", 5.99, None),
        ("PAPER TOWELS 6RL", 8.79, None),
    ]
    subtotal = 0.0
    for name, price, extra in items:
        row(name, f"{price:.2f} " + ("T" if name.startswith(("SPARKLING", "PAPER")) else "F"))
        if extra:
            row("  " + extra)
        subtotal += price
    row("  MEMBER SAVINGS", "-2.50")
    subtotal -= 2.50
    rule()
    taxable = 5.99 + 8.79
    tax = round(taxable * 0.0925, 2)
    total = subtotal + tax
    row("SUBTOTAL", f"{subtotal:.2f}")
    row("TAX 9.25% (T)", f"{tax:.2f}")
    y += 6
    d.text((x0, y), "TOTAL", font=font("mono-bold", 30), fill=ink)
    text_right(d, x0 + ncols * cw, y, f"${total:.2f}", font("mono-bold", 30), ink)
    y += 46
    row("VISA CREDIT", f"{total:.2f}")
    row("  ************4821", "CHIP")
    row("  AUTH 07331B", "APPROVED")
    row("CHANGE DUE", "0.00")
    rule()
    row(f"ITEMS SOLD: {len(items)}")
    row("YOU SAVED TODAY:", "$2.50", fmb)
    y += 16
    text_center(d, W / 2, y + 12, "THANK YOU FOR SHOPPING LOCAL!", fmb, ink)
    y += 34
    text_center(d, W / 2, y + 12, "Returns within 30 days with receipt", fm, ink)
    y += 48
    barcode(d, 70, y, W - 140, 90, rng, digits="0217 0314 5821 4092", f=fm, fill=ink)
    # torn-paper bottom edge
    edge = []
    for x in range(0, W + 14, 14):
        edge.append((x, H - 12 + (6 if (x // 14) % 2 else 0)))
    d.polygon(edge + [(W, H), (0, H)], fill=(210, 210, 205))
    return img


def doc_invoice(rng: random.Random) -> Image.Image:
    W, H = 1240, 1754
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    m = 90
    dark = (30, 34, 40)
    accent = (200, 90, 20)
    grey = (110, 115, 120)
    # logo
    d.polygon([(m, 120), (m + 50, 60), (m + 100, 120)], fill=accent)
    d.polygon([(m + 30, 120), (m + 70, 75), (m + 110, 120)], fill=(60, 70, 85))
    d.text((m + 130, 62), "NORTHWIND", font=font("sans-bold", 40), fill=dark)
    d.text((m + 132, 108), "TECHNICAL SERVICES LTD", font=font("sans", 18), fill=grey)
    text_right(d, W - m, 60, "INVOICE", font("sans-bold", 56), accent)
    fs = font("sans", 19)
    fsb = font("sans-bold", 19)
    meta = [
        ("Invoice no.", "INV-2024-0317"),
        ("Issue date", "17 Sep 2024"),
        ("Due date", "17 Oct 2024"),
        ("Customer ID", "C-00482"),
        ("PO number", "PO-77120"),
    ]
    yy = 140
    for k, v in meta:
        text_right(d, W - m - 200, yy, k, fs, grey)
        text_right(d, W - m, yy, v, fsb, dark)
        yy += 28
    # addresses
    y = 310
    addr_from = [
        "Northwind Technical Services Ltd",
        "Unit 9, Brookside Business Park",
        "Leeds LS11 5PQ",
        "VAT reg. GB 294 5561 02",
    ]
    addr_to = [
        "Halden & Pryce Architects LLP",
        "Attn: Accounts Payable",
        "3rd Floor, 41 Queen Street",
        "Bristol BS1 4HG",
    ]
    ship_to = [
        "Halden & Pryce \u2013 Site Office",
        "Marlowe Quay Development",
        "Harbour Road",
        "Bristol BS1 6XZ",
    ]
    for x, title, lines in [
        (m, "FROM", addr_from),
        (m + 395, "BILL TO", addr_to),
        (m + 750, "SHIP TO", ship_to),
    ]:
        d.text((x, y), title, font=font("sans-bold", 16), fill=accent)
        ly = y + 28
        for i, line in enumerate(lines):
            d.text((x, ly), line, font=fsb if i == 0 else fs, fill=dark)
            ly += 27
    y = 480
    # table
    cols = [
        ("#", 0.05, "l"),
        ("Description", 0.45, "l"),
        ("Qty", 0.08, "r"),
        ("Unit price", 0.14, "r"),
        ("VAT", 0.08, "r"),
        ("Amount (\u00a3)", 0.20, "r"),
    ]
    tw_ = W - 2 * m
    d.rectangle([m, y, W - m, y + 44], fill=(45, 52, 62))
    cx = m
    fh = font("sans-bold", 18)
    for name, frac, al in cols:
        if al == "l":
            d.text((cx + 10, y + 12), name, font=fh, fill="white")
        else:
            text_right(d, cx + frac * tw_ - 10, y + 12, name, fh, "white")
        cx += frac * tw_
    y += 44
    lines = [
        ("On-site network survey, 2 engineers", "Marlowe Quay site office, 3 Sep 2024", 1, 1450.00),
        ("Managed switch 48-port PoE+", "Model NW-S48P, 5-year warranty", 2, 1289.00),
        ("Wireless access point, ceiling mount", "Wi-Fi 6E, incl. mounting kit", 9, 214.50),
        ("Cat6A cabling and termination", "Per outlet, up to 40 m run", 36, 68.00),
        ("Patch panel 24-port, 1U", "", 3, 94.20),
        ("UPS 1500 VA rack mount", "Line-interactive, network card", 1, 742.00),
        ("Configuration and commissioning", "Engineer hours", 14, 85.00),
        ("Travel and accommodation", "Leeds \u2013 Bristol, 2 nights", 1, 386.40),
    ]
    subtotal = 0.0
    fr = font("sans", 18)
    fr2 = font("sans", 15)
    for i, (desc, sub, qty, unit) in enumerate(lines, 1):
        rh = 62 if sub else 44
        if i % 2 == 0:
            d.rectangle([m, y, W - m, y + rh], fill=(247, 247, 249))
        amount = qty * unit
        subtotal += amount
        vals = [str(i), desc, str(qty), f"{unit:,.2f}", "20%", f"{amount:,.2f}"]
        cx = m
        for (name, frac, al), v in zip(cols, vals):
            if al == "l":
                d.text((cx + 10, y + 12), v, font=fr, fill=dark)
                if name == "Description" and sub:
                    d.text((cx + 10, y + 37), sub, font=fr2, fill=grey)
            else:
                text_right(d, cx + frac * tw_ - 10, y + 12, v, fr, dark)
            cx += frac * tw_
        y += rh
        d.line([(m, y), (W - m, y)], fill=(220, 222, 226), width=1)
    y += 30
    vat = subtotal * 0.20
    total = subtotal + vat
    tx = W - m - 430
    for k, v, bold in [
        ("Subtotal", subtotal, False),
        ("VAT 20%", vat, False),
        ("Total due", total, True),
    ]:
        f_ = font("sans-bold", 24) if bold else fs
        if bold:
            d.rectangle([tx - 20, y - 10, W - m, y + 42], fill=(253, 236, 222))
        d.text((tx, y), k, font=f_, fill=dark)
        text_right(d, W - m - 10, y, f"\u00a3{v:,.2f}", f_, dark)
        y += 38 if not bold else 56
    y += 40
    d.text((m, y), "Payment terms", font=font("sans-bold", 20), fill=dark)
    y += 34
    terms = (
        "Payment is due within 30 days of the invoice date. Please quote the invoice number as the "
        "payment reference. Late payments may incur interest at 8% above the Bank of England base rate "
        "under the Late Payment of Commercial Debts (Interest) Act 1998."
    )
    y = paragraph(d, m, y, terms, fs, W - 2 * m, fill=dark, leading=1.45) + 24
    d.text((m, y), "Bank details", font=font("sans-bold", 20), fill=dark)
    y += 34
    for k, v in [
        ("Bank", "Pennine Commercial Bank"),
        ("Account name", "Northwind Technical Services Ltd"),
        ("Sort code", "40-22-17"),
        ("Account no.", "83021946"),
        ("IBAN", "GB71 PNCB 4022 1783 0219 46"),
    ]:
        d.text((m, y), k, font=fs, fill=grey)
        d.text((m + 170, y), v, font=font("mono", 19), fill=dark)
        y += 28
    d.line([(m, H - 100), (W - m, H - 100)], fill=accent, width=3)
    text_center(
        d,
        W / 2,
        H - 70,
        "Northwind Technical Services Ltd  \u00b7  Registered in England No. 08815230  \u00b7  "
        "accounts@northwind.example  \u00b7  0113 496 0725",
        font("sans", 15),
        grey,
    )
    return img


def doc_scanned_memo(rng: random.Random) -> Image.Image:
    # the typed page
    PW, PH = 1020, 1320
    page = Image.new("L", (PW, PH), 250)
    d = ImageDraw.Draw(page)
    m = 95
    ink = 35
    d.text((m, 80), "MEMORANDUM", font=font("serif-bold", 40), fill=ink)
    d.line([(m, 140), (PW - m, 140)], fill=ink, width=3)
    fm = font("mono", 21)
    fmb = font("mono-bold", 21)
    y = 170
    for k, v in [
        ("TO:", "All staff, Hamilton Building (East Wing)"),
        ("FROM:", "Facilities Management"),
        ("DATE:", "30 September 2024"),
        ("SUBJECT:", "Temporary closure of the East Wing"),
    ]:
        d.text((m, y), k, font=fmb, fill=ink)
        d.text((m + 150, y), v, font=fm, fill=ink)
        y += 34
    d.line([(m, y + 8), (PW - m, y + 8)], fill=ink, width=1)
    y += 40
    for p in MEMO_BODY:
        y = paragraph(d, m, y, p, fm, PW - 2 * m, fill=ink, leading=1.5) + 20
    y += 20
    d.text((m, y), "Key dates", font=fmb, fill=ink)
    y += 36
    key_top = y
    ring_y = y
    for line in [
        "  9 Oct   Deadline for equipment requests",
        " 10 Oct   Removal crates delivered",
        " 11 Oct   Crates packed and labelled by 4:00 pm",
        " 14 Oct   Works begin",
        " 28 Oct   East wing reopens",
    ]:
        if "14 Oct" in line:
            ring_y = y
        d.text((m, y), line, font=fm, fill=ink)
        y += 31
    y += 30
    d.text((m, y), "R. Castellanos", font=font("serif-italic", 30), fill=70)
    y += 42
    d.text((m, y), "Head of Facilities, ext. 4410", font=fm, fill=ink)
    # ring one date with a "pen" ellipse and add a hand-written note beside the list
    d.ellipse([m - 4, ring_y - 8, m + tw(fm, " 14 Oct") + 14, ring_y + 30], outline=80, width=3)
    note = Image.new("LA", (330, 110), (0, 0))
    nd = ImageDraw.Draw(note)
    nd.text((5, 5), "Ask IT re:", font=font("sans-italic", 27), fill=(70, 255))
    nd.text((5, 45), "2nd monitor!", font=font("sans-italic", 27), fill=(70, 255))
    note = note.rotate(7, expand=True, resample=Image.Resampling.BICUBIC)
    page.paste(note.getchannel(0), (PW - m - 300, int(key_top) + 150), note.getchannel(1))
    # scanner bed: grey background, page slightly rotated, uneven illumination
    W, H = 1100, 1400
    bed = vgradient((W, H), (96, 96, 96), (70, 70, 70)).convert("L")
    rot = -1.2
    mask = Image.new("L", (PW, PH), 255).rotate(rot, expand=True, resample=Image.Resampling.BICUBIC)
    page_r = page.rotate(rot, expand=True, resample=Image.Resampling.BICUBIC, fillcolor=250)
    shadow = mask.filter(ImageFilter.GaussianBlur(10))
    ox, oy = (W - page_r.width) // 2, (H - page_r.height) // 2
    bed.paste(Image.new("L", shadow.size, 40), (ox + 8, oy + 10), shadow)
    bed.paste(page_r, (ox, oy), mask)
    light = vgradient((H, W), (255, 255, 255), (228, 228, 228)).convert("L").rotate(90, expand=True)
    out = ImageChops.multiply(bed, light)
    dd = ImageDraw.Draw(out)
    for _ in range(60):  # dust specks
        x_, y_ = rng.randrange(W), rng.randrange(H)
        r_ = rng.choice([1, 1, 1, 2])
        dd.ellipse([x_, y_, x_ + r_, y_ + r_], fill=rng.randrange(60, 140))
    out = out.filter(ImageFilter.GaussianBlur(0.6))
    return out.convert("RGB")


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------

PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


class Axes:
    """A rectangular plot area with linear x/y mapping."""

    def __init__(self, box, xlim, ylim):
        self.l, self.t, self.r, self.b = box
        self.xlim, self.ylim = xlim, ylim

    def x(self, v: float) -> float:
        return self.l + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (self.r - self.l)

    def y(self, v: float) -> float:
        return self.b - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (self.b - self.t)


def draw_yaxis(d, ax: Axes, ticks, fmt, f, grid=True, color=(60, 60, 60)):
    for v in ticks:
        yy = ax.y(v)
        if grid:
            d.line([(ax.l, yy), (ax.r, yy)], fill=(225, 225, 225), width=1)
        d.line([(ax.l - 8, yy), (ax.l, yy)], fill=color, width=2)
        s = fmt(v)
        d.text((ax.l - 14 - tw(f, s), yy - f.size * 0.6), s, font=f, fill=color)
    d.line([(ax.l, ax.t), (ax.l, ax.b)], fill=color, width=2)


def draw_legend(d, x, y, items, f, kind="box", border=True):
    """items: list of (label, color). Returns (w, h)."""
    rowh = f.size * 1.6
    w = max(tw(f, s) for s, _ in items) + 60
    h = rowh * len(items) + 16
    if border:
        d.rounded_rectangle([x, y, x + w, y + h], radius=6, fill="white", outline=(190, 190, 190))
    for i, (s, c) in enumerate(items):
        cy = y + 8 + rowh * i + rowh / 2
        if kind == "box":
            d.rectangle([x + 12, cy - 9, x + 32, cy + 9], fill=c)
        elif kind == "line":
            d.line([(x + 8, cy), (x + 38, cy)], fill=c, width=4)
            d.ellipse([x + 17, cy - 5, x + 29, cy + 5], fill=c)
        else:
            d.ellipse([x + 14, cy - 7, x + 28, cy + 7], fill=c, outline="white")
        d.text((x + 46, cy - f.size * 0.6), s, font=f, fill=(40, 40, 40))
    return w, h


def chart_bar(rng: random.Random) -> Image.Image:
    W, H = 1200, 800
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text(
        (60, 30),
        "Quarterly revenue by region, FY2024",
        font=font("sans-bold", 32),
        fill=(30, 30, 30),
    )
    d.text(
        (60, 76),
        "USD millions; Q4 figures are preliminary",
        font=font("sans", 20),
        fill=(100, 100, 100),
    )
    regions = ["North America", "Europe", "Asia-Pacific"]
    quarters = ["Q1", "Q2", "Q3", "Q4"]
    data = [[42.1, 45.8, 47.3, 52.9], [31.4, 29.8, 33.6, 36.2], [18.7, 22.5, 27.9, 31.4]]
    ax = Axes((130, 150, W - 60, H - 120), (0, 4), (0, 60))
    fy = font("sans", 18)
    draw_yaxis(d, ax, range(0, 61, 10), lambda v: f"{v:d}", fy)
    d.line([(ax.l, ax.b), (ax.r, ax.b)], fill=(60, 60, 60), width=2)
    group_w = (ax.r - ax.l) / 4
    bar_w = group_w * 0.22
    fv = font("cond", 15)
    for qi, q in enumerate(quarters):
        gx = ax.l + group_w * qi + group_w * 0.17
        for ri in range(3):
            v = data[ri][qi]
            x0 = gx + ri * (bar_w + 4)
            d.rectangle([x0, ax.y(v), x0 + bar_w, ax.b], fill=PALETTE[ri])
            text_center(d, x0 + bar_w / 2, ax.y(v) - 12, f"{v:.1f}", fv, (50, 50, 50))
        text_center(
            d, ax.l + group_w * (qi + 0.5), ax.b + 24, q + " 2024", font("sans", 20), (40, 40, 40)
        )
    rotated_text(
        img, (45, (ax.t + ax.b) / 2), "Revenue (USD m)", font("sans", 20), (40, 40, 40), 90
    )
    text_center(d, (ax.l + ax.r) / 2, H - 45, "Fiscal quarter", font("sans", 20), (40, 40, 40))
    draw_legend(d, ax.l + 20, ax.t - 10, list(zip(regions, PALETTE)), font("sans", 18))
    d.text(
        (W - 330, H - 30),
        "Source: company filings (illustrative)",
        font=font("sans-italic", 14),
        fill=(130, 130, 130),
    )
    return img


def chart_line(rng: random.Random) -> Image.Image:
    W, H = 1400, 700
    img = Image.new("RGB", (W, H), (250, 250, 252))
    d = ImageDraw.Draw(img)
    d.text(
        (70, 28), "Monthly mean temperature, 2023", font=font("sans-bold", 30), fill=(25, 25, 25)
    )
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    cities = {
        "Oslo": [-3.1, -2.6, 0.9, 5.4, 10.8, 15.2, 17.6, 16.4, 11.7, 6.3, 1.4, -2.2],
        "Madrid": [6.4, 7.9, 11.2, 13.4, 17.6, 23.1, 26.5, 26.0, 21.3, 15.4, 9.8, 6.9],
        "Singapore": [26.6, 27.1, 27.6, 28.0, 28.4, 28.3, 27.9, 27.8, 27.7, 27.6, 27.0, 26.5],
        "Melbourne": [21.0, 21.3, 19.1, 16.2, 13.4, 11.1, 10.4, 11.5, 13.3, 15.4, 17.7, 19.5],
    }
    ax = Axes((110, 110, W - 280, H - 90), (-0.5, 11.5), (-10, 35))
    fy = font("sans", 18)
    draw_yaxis(d, ax, range(-10, 36, 5), lambda v: f"{v:d}", fy)
    d.line([(ax.l, ax.y(0)), (ax.r, ax.y(0))], fill=(120, 120, 120), width=1)
    d.line([(ax.l, ax.b), (ax.r, ax.b)], fill=(60, 60, 60), width=2)
    for i, mname in enumerate(months):
        xx = ax.x(i)
        d.line([(xx, ax.b), (xx, ax.b + 7)], fill=(60, 60, 60), width=2)
        text_center(d, xx, ax.b + 24, mname, fy, (40, 40, 40))
    for ci, (_name, vals) in enumerate(cities.items()):
        c = PALETTE[ci]
        pts = [(ax.x(i), ax.y(v)) for i, v in enumerate(vals)]
        d.line(pts, fill=c, width=4, joint="curve")
        for px, py in pts:
            d.ellipse([px - 6, py - 6, px + 6, py + 6], fill=c, outline="white", width=2)
    # annotate the hottest point
    px, py = ax.x(6), ax.y(26.5)
    arrow(d, (px + 90, py - 55), (px + 8, py - 8), fill=(60, 60, 60), width=2, head=12)
    d.text(
        (px + 94, py - 78),
        "Madrid peak 26.5 \u00b0C",
        font=font("sans-italic", 17),
        fill=(60, 60, 60),
    )
    rotated_text(
        img, (40, (ax.t + ax.b) / 2), "Temperature (\u00b0C)", font("sans", 20), (40, 40, 40), 90
    )
    draw_legend(d, W - 250, 120, list(zip(cities.keys(), PALETTE)), font("sans", 20), kind="line")
    d.text(
        (W - 250, 330),
        "Values are monthly\nmeans of daily\naverages.",
        font=font("sans", 16),
        fill=(110, 110, 110),
        spacing=6,
    )
    return img


def chart_pie(rng: random.Random) -> Image.Image:
    S = 2  # supersampling factor for smooth edges
    W, H = 900, 900
    img = Image.new("RGB", (W * S, H * S), "white")
    d = ImageDraw.Draw(img)
    text_center(
        d,
        W * S / 2,
        50 * S,
        "Household energy use by end use",
        font("sans-bold", 30 * S),
        (25, 25, 25),
    )
    text_center(
        d,
        W * S / 2,
        92 * S,
        "Average home, share of annual kWh",
        font("sans", 19 * S),
        (100, 100, 100),
    )
    parts = [
        ("Space heating", 42.0),
        ("Water heating", 18.5),
        ("Appliances", 14.2),
        ("Cooking", 7.8),
        ("Lighting", 6.1),
        ("Electronics", 5.9),
        ("Other", 5.5),
    ]
    cx, cy, r = 360 * S, 470 * S, 250 * S
    start = -90.0
    fl = font("sans-bold", 18 * S)
    for i, (_name, pct) in enumerate(parts):
        ext = pct / 100 * 360
        mid = math.radians(start + ext / 2)
        off = 18 * S if i == 0 else 0  # explode the largest slice
        ox, oy = off * math.cos(mid), off * math.sin(mid)
        d.pieslice(
            [cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy],
            start,
            start + ext,
            fill=PALETTE[i],
            outline="white",
            width=3 * S,
        )
        if pct >= 7:
            lx, ly = cx + ox + r * 0.64 * math.cos(mid), cy + oy + r * 0.64 * math.sin(mid)
            text_center(d, lx, ly, f"{pct:.1f}%", fl, "white")
        else:
            x1, y1 = cx + (r + 4 * S) * math.cos(mid), cy + (r + 4 * S) * math.sin(mid)
            x2, y2 = cx + (r + 40 * S) * math.cos(mid), cy + (r + 40 * S) * math.sin(mid)
            d.line([(x1, y1), (x2, y2)], fill=(90, 90, 90), width=2 * S)
            d.text(
                (x2 + (6 * S if math.cos(mid) >= 0 else -70 * S), y2 - 12 * S),
                f"{pct:.1f}%",
                font=font("sans", 17 * S),
                fill=(60, 60, 60),
            )
        start += ext
    # donut hole with total
    hr = r * 0.36
    d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill="white")
    text_center(d, cx, cy - 14 * S, "10,650", font("sans-bold", 30 * S), (30, 30, 30))
    text_center(d, cx, cy + 20 * S, "kWh / year", font("sans", 17 * S), (100, 100, 100))
    draw_legend(
        d,
        670 * S,
        330 * S,
        [(n, PALETTE[i]) for i, (n, _) in enumerate(parts)],
        font("sans", 18 * S),
        border=False,
    )
    text_center(
        d,
        W * S / 2,
        (H - 40) * S,
        "Figures are illustrative and rounded to one decimal place.",
        font("sans-italic", 15 * S),
        (130, 130, 130),
    )
    return img.resize((W, H), Image.Resampling.LANCZOS)


def chart_scatter(rng: random.Random) -> Image.Image:
    W, H = 1000, 1000
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((80, 30), "Engine size vs. fuel economy", font=font("sans-bold", 30), fill=(25, 25, 25))
    d.text(
        (80, 74),
        "n = 120 test vehicles, combined cycle",
        font=font("sans", 18),
        fill=(100, 100, 100),
    )
    ax = Axes((120, 130, W - 60, H - 120), (0.8, 5.2), (0, 60))
    fy = font("sans", 18)
    draw_yaxis(d, ax, range(0, 61, 10), lambda v: f"{v:d}", fy)
    d.line([(ax.l, ax.b), (ax.r, ax.b)], fill=(60, 60, 60), width=2)
    for v in [1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5]:
        xx = ax.x(v)
        d.line([(xx, ax.t), (xx, ax.b)], fill=(235, 235, 235), width=1)
        d.line([(xx, ax.b), (xx, ax.b + 7)], fill=(60, 60, 60), width=2)
        text_center(d, xx, ax.b + 22, f"{v:.1f}", fy, (40, 40, 40))
    text_center(
        d, (ax.l + ax.r) / 2, H - 55, "Engine displacement (litres)", font("sans", 21), (40, 40, 40)
    )
    rotated_text(
        img, (40, (ax.t + ax.b) / 2), "Fuel economy (mpg)", font("sans", 21), (40, 40, 40), 90
    )
    groups = [("Petrol", PALETTE[0], 0), ("Diesel", PALETTE[1], 6), ("Hybrid", PALETTE[2], 10)]
    xs_all, ys_all = [], []
    for name, c, bonus in groups:
        n = 40
        for _ in range(n):
            x = rng.uniform(1.0, 5.0) if name != "Hybrid" else rng.uniform(1.0, 2.6)
            y = 52 - 8.2 * x + bonus + rng.gauss(0, 3.2)
            y = max(3, min(58, y))
            xs_all.append(x)
            ys_all.append(y)
            px, py = ax.x(x), ax.y(y)
            d.ellipse([px - 7, py - 7, px + 7, py + 7], fill=c, outline=(255, 255, 255), width=1)
    # least-squares fit over all points
    n = len(xs_all)
    mx, my = sum(xs_all) / n, sum(ys_all) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs_all, ys_all))
    sxx = sum((a - mx) ** 2 for a in xs_all)
    slope = sxy / sxx
    icpt = my - slope * mx
    ss_tot = sum((b - my) ** 2 for b in ys_all)
    ss_res = sum((b - (icpt + slope * a)) ** 2 for a, b in zip(xs_all, ys_all))
    r2 = 1 - ss_res / ss_tot
    dashed_line(
        d,
        (ax.x(0.9), ax.y(icpt + slope * 0.9)),
        (ax.x(5.1), ax.y(icpt + slope * 5.1)),
        fill=(40, 40, 40),
        width=3,
        dash=14,
        gap=8,
    )
    d.rounded_rectangle(
        [ax.r - 330, ax.t + 20, ax.r - 20, ax.t + 100],
        radius=8,
        fill=(248, 248, 248),
        outline=(200, 200, 200),
    )
    d.text(
        (ax.r - 315, ax.t + 30),
        f"y = {icpt:.1f} \u2212 {abs(slope):.2f}x",
        font=font("mono", 20),
        fill=(30, 30, 30),
    )
    d.text((ax.r - 315, ax.t + 62), f"R\u00b2 = {r2:.3f}", font=font("mono", 20), fill=(30, 30, 30))
    draw_legend(
        d, ax.r - 200, ax.t + 130, [(g[0], g[1]) for g in groups], font("sans", 19), kind="dot"
    )
    return img


# --------------------------------------------------------------------------------------------
# Screenshots / UI
# --------------------------------------------------------------------------------------------


def window_frame(d, box, title: str, dark: bool = False):
    left, t, r, b = box
    bar = (48, 48, 52) if dark else (232, 232, 236)
    d.rounded_rectangle(
        box,
        radius=10,
        fill=(30, 30, 34) if dark else (250, 250, 250),
        outline=(20, 20, 20) if dark else (170, 170, 175),
    )
    d.rounded_rectangle([left, t, r, t + 40], radius=10, fill=bar)
    d.rectangle([left, t + 20, r, t + 40], fill=bar)
    for i, c in enumerate([(255, 95, 87), (254, 188, 46), (40, 200, 64)]):
        d.ellipse([left + 16 + i * 24, t + 13, left + 30 + i * 24, t + 27], fill=c)
    text_center(
        d, (left + r) / 2, t + 20, title, font("sans", 16), (220, 220, 220) if dark else (60, 60, 60)
    )


def screen_terminal(rng: random.Random) -> Image.Image:
    W, H = 1600, 900
    img = vgradient((W, H), (40, 60, 90), (110, 80, 120))
    d = ImageDraw.Draw(img)
    box = (70, 50, W - 70, H - 40)
    window_frame(d, box, "radxa@rock-5b: ~/rksmolvlm \u2014 bash \u2014 160\u00d740", dark=True)
    fm = font("mono", 18)
    fmb = font("mono-bold", 18)
    lh = 25
    x0, y = box[0] + 18, box[1] + 56
    G, B, Wt, Y = (80, 220, 100), (100, 160, 255), (220, 220, 220), (230, 200, 90)
    Gr, C = (140, 140, 140), (90, 210, 220)

    def prompt(cmd: str) -> None:
        nonlocal y
        p1 = "radxa@rock-5b"
        d.text((x0, y), p1, font=fmb, fill=G)
        x = x0 + tw(fmb, p1)
        d.text((x, y), ":", font=fm, fill=Wt)
        x += tw(fm, ":")
        d.text((x, y), "~/rksmolvlm", font=fmb, fill=B)
        x += tw(fmb, "~/rksmolvlm")
        d.text((x, y), "$ " + cmd, font=fm, fill=Wt)
        y += lh

    def out(segments) -> None:
        nonlocal y
        x = x0
        if isinstance(segments, str):
            segments = [(segments, Wt)]
        for s, c in segments:
            d.text((x, y), s, font=fm, fill=c)
            x += tw(fm, s)
        y += lh

    prompt("ls -la")
    out("total 64")
    listing = [
        ("drwxr-xr-x  7 radxa radxa  4096 Sep 17 10:21 ", ".", B),
        ("drwxr-x--- 19 radxa radxa  4096 Sep 17 09:58 ", "..", B),
        ("-rw-r--r--  1 radxa radxa   412 Sep 16 18:03 ", ".gitignore", Wt),
        ("drwxr-xr-x  3 radxa radxa  4096 Sep 17 10:20 ", "calibration", B),
        ("-rw-r--r--  1 radxa radxa  2950 Sep 16 18:03 ", "pyproject.toml", Wt),
        ("drwxr-xr-x  2 radxa radxa  4096 Sep 17 10:21 ", "runtime", B),
        ("-rwxr-xr-x  1 radxa radxa  1873 Sep 16 18:03 ", "run_demo.sh", G),
        ("-rw-r--r--  1 radxa radxa  6144 Sep 17 10:19 ", "README.md", Wt),
    ]
    for pre, name, c in listing:
        out([(pre, Wt), (name, c)])
    prompt("git log --oneline -5")
    for h, msg in [
        ("3f9c2e1", "runtime: reuse NPU context between requests"),
        ("a41d7b0", "convert: per-layer calibration for the connector"),
        ("9e0b55c", "boards: add RK3576 profile"),
        ("c2d8f13", "docs: explain image splitting"),
        ("71aa402", "initial import"),
    ]:
        out([(h + " ", Y), (msg, Wt)])
    prompt("python -m rksmolvlm.runtime --image photo.jpg --prompt 'Describe the image.'")
    out([("[INFO] ", C), ("loading vision encoder (int8, 3 cores) ...", Wt)])
    out([("[INFO] ", C), ("image 1024x768 -> 4 tiles + 1 global view", Wt)])
    bar_done = 32
    out(
        [
            ("encode  ", Wt),
            ("\u2588" * bar_done, G),
            ("\u2591" * (40 - bar_done), Gr),
            ("  80%  4/5 tiles  0.41 s", Wt),
        ]
    )
    out([("[WARN] ", Y), ("prompt truncated to 2048 tokens", Wt)])
    out([("[INFO] ", C), ("first token after 812 ms, 17.4 tok/s", Wt)])
    out("")
    out("A red motorcycle parked in a cluttered garage next to shelves with boxes.")
    out("")
    prompt("df -h /")
    out("Filesystem      Size  Used Avail Use% Mounted on")
    out("/dev/mmcblk0p2   58G   21G   35G  38% /")
    prompt("")
    # cursor block
    d.rectangle(
        [
            x0 + tw(fmb, "radxa@rock-5b:~/rksmolvlm") + tw(fm, "$ "),
            y - lh + 2,
            x0 + tw(fmb, "radxa@rock-5b:~/rksmolvlm") + tw(fm, "$ ") + 11,
            y - 3,
        ],
        fill=Wt,
    )
    # scrollbar
    d.rounded_rectangle(
        [box[2] - 14, box[1] + 60, box[2] - 6, box[1] + 260], radius=4, fill=(90, 90, 95)
    )
    return img


def toggle(d, x, y, on: bool):
    col = (52, 120, 246) if on else (200, 200, 205)
    d.rounded_rectangle([x, y, x + 52, y + 28], radius=14, fill=col)
    kx = x + 26 if on else x + 2
    d.ellipse([kx, y + 2, kx + 24, y + 26], fill="white")


def screen_settings(rng: random.Random) -> Image.Image:
    W, H = 1280, 800
    img = vgradient((W, H), (70, 130, 180), (170, 200, 220))
    d = ImageDraw.Draw(img)
    # desktop top bar and a few icons
    d.rectangle([0, 0, W, 30], fill=(25, 25, 30))
    d.text((14, 6), "Activities", font=font("sans", 15), fill="white")
    text_center(d, W / 2, 15, "Tue 17 Sep  10:24", font("sans-bold", 15), "white")
    text_right(d, W - 14, 6, "EN   \u25be  87%", font("sans", 15), "white")
    for i, label in enumerate(["Home", "Documents", "Trash"]):
        yy = 70 + i * 110
        d.rounded_rectangle(
            [30, yy, 94, yy + 56], radius=6, fill=(240, 200, 90) if i < 2 else (200, 200, 210)
        )
        text_center(d, 62, yy + 74, label, font("sans", 14), "white")
    box = (200, 70, W - 120, H - 40)
    window_frame(d, box, "Preferences")
    left, t, r, b = box
    # sidebar
    sb_r = left + 250
    d.rounded_rectangle([left + 1, t + 40, sb_r, b - 1], radius=9, fill=(243, 243, 246))
    d.rectangle([left + 1, t + 40, sb_r, b - 12], fill=(243, 243, 246))
    d.rectangle([sb_r - 12, t + 40, sb_r, b - 1], fill=(243, 243, 246))
    d.line([(sb_r, t + 40), (sb_r, b - 1)], fill=(210, 210, 215))
    d.rounded_rectangle(
        [left + 12, t + 52, sb_r - 12, t + 84], radius=8, fill="white", outline=(210, 210, 215)
    )
    d.ellipse([left + 24, t + 60, left + 36, t + 72], outline=(140, 140, 140), width=2)  # magnifier
    d.line([(left + 35, t + 71), (left + 41, t + 77)], fill=(140, 140, 140), width=2)
    d.text((left + 50, t + 58), "Search settings", font=font("sans", 15), fill=(140, 140, 140))
    items = [
        "General",
        "Appearance",
        "Notifications",
        "Network",
        "Privacy & Security",
        "Storage",
        "Updates",
        "Keyboard",
        "Accessibility",
        "About",
    ]
    fi = font("default", 18)
    for i, it in enumerate(items):
        yy = t + 100 + i * 40
        if it == "Network":
            d.rounded_rectangle([left + 10, yy - 4, sb_r - 10, yy + 30], radius=7, fill=(52, 120, 246))
            d.text((left + 26, yy + 2), it, font=fi, fill="white")
        else:
            d.text((left + 26, yy + 2), it, font=fi, fill=(40, 40, 45))
    # content pane
    cx = sb_r + 40
    y = t + 62
    d.text((cx, y), "Network", font=font("sans-bold", 28), fill=(30, 30, 35))
    y += 52
    fl = font("sans", 17)
    fls = font("sans", 14)
    rows = [
        ("Wi-Fi", "Connected to \u201cHomeNet-5G\u201d", True),
        ("Bluetooth", "Discoverable as \u201crock-5b\u201d", False),
        ("Airplane mode", "Turns off all wireless connections", False),
    ]
    for name, sub, on in rows:
        d.text((cx, y), name, font=fl, fill=(30, 30, 35))
        d.text((cx, y + 24), sub, font=fls, fill=(120, 120, 125))
        toggle(d, r - 110, y + 6, on)
        y += 60
        d.line([(cx, y - 8), (r - 40, y - 8)], fill=(225, 225, 230))
    y += 10
    d.text((cx, y), "IPv4 method", font=fl, fill=(30, 30, 35))
    rx = cx + 200
    for opt, sel in [("Automatic", False), ("Manual", True), ("Link-local", False)]:
        d.ellipse([rx, y + 1, rx + 20, y + 21], outline=(120, 120, 125), width=2)
        if sel:
            d.ellipse([rx + 5, y + 6, rx + 15, y + 16], fill=(52, 120, 246))
        d.text((rx + 28, y), opt, font=fl, fill=(30, 30, 35))
        rx += 60 + tw(fl, opt)
    y += 46
    fmn = font("mono", 16)
    for k, v in [
        ("Address", "192.168.1.57"),
        ("Netmask", "255.255.255.0"),
        ("Gateway", "192.168.1.1"),
        ("DNS", "1.1.1.1, 9.9.9.9"),
    ]:
        d.text((cx + 20, y + 6), k, font=fl, fill=(60, 60, 65))
        d.rounded_rectangle(
            [cx + 200, y, cx + 520, y + 32], radius=5, fill="white", outline=(190, 190, 195)
        )
        d.text((cx + 212, y + 7), v, font=fmn, fill=(20, 20, 25))
        y += 42
    y += 10
    d.text((cx, y), "MTU", font=fl, fill=(30, 30, 35))
    # dropdown
    d.rounded_rectangle(
        [cx + 200, y - 4, cx + 380, y + 28], radius=5, fill="white", outline=(190, 190, 195)
    )
    d.text((cx + 212, y + 2), "1500 (default)", font=fl, fill=(20, 20, 25))
    d.text((cx + 356, y + 1), "\u25be", font=fl, fill=(80, 80, 85))
    y += 50
    d.text((cx, y), "Metered connection limit", font=fl, fill=(30, 30, 35))
    sx0, sx1 = cx + 250, r - 140
    d.line([(sx0, y + 12), (sx1, y + 12)], fill=(210, 210, 215), width=6)
    knob = sx0 + 0.35 * (sx1 - sx0)
    d.line([(sx0, y + 12), (knob, y + 12)], fill=(52, 120, 246), width=6)
    d.ellipse([knob - 11, y + 1, knob + 11, y + 23], fill="white", outline=(150, 150, 155), width=2)
    d.text((sx1 + 16, y + 2), "35 GB", font=fl, fill=(60, 60, 65))
    # buttons
    by = b - 64
    d.line([(sb_r, by - 16), (r, by - 16)], fill=(225, 225, 230))
    for label, primary, x_ in [
        ("Cancel", False, r - 360),
        ("Apply", False, r - 240),
        ("OK", True, r - 120),
    ]:
        d.rounded_rectangle(
            [x_, by, x_ + 100, by + 38],
            radius=7,
            fill=(52, 120, 246) if primary else "white",
            outline=(52, 120, 246) if primary else (190, 190, 195),
        )
        text_center(
            d, x_ + 50, by + 19, label, font("sans", 17), "white" if primary else (30, 30, 35)
        )
    d.ellipse([sb_r + 40, by + 9, sb_r + 58, by + 27], outline=(120, 120, 125), width=2)
    text_center(d, sb_r + 49, by + 18, "i", font("sans-bold", 12), (120, 120, 125))
    d.text((sb_r + 66, by + 9), "Applied after reconnecting.", font=fls, fill=(120, 120, 125))
    return img


def mountains(size, rng: random.Random, sky0, sky1, ranges) -> Image.Image:
    """A simple illustrated landscape used as a hero/card image."""
    w, h = size
    im = vgradient((w, h), sky0, sky1)
    d = ImageDraw.Draw(im)
    d.ellipse([w * 0.72, h * 0.12, w * 0.72 + h * 0.18, h * 0.30], fill=(255, 240, 200))
    for i, col in enumerate(ranges):
        base = h * (0.45 + 0.16 * i)
        pts = [(0, h)]
        x = 0.0
        while x <= w:
            pts.append((x, base - rng.uniform(0.05, 0.28) * h * (1 - 0.25 * i)))
            x += rng.uniform(w * 0.06, w * 0.16)
        pts += [(w, base - rng.uniform(0.05, 0.28) * h * (1 - 0.25 * i)), (w, h)]
        d.polygon(pts, fill=col)
    return im


def screen_web(rng: random.Random) -> Image.Image:
    W, H = 1600, 900
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    # browser chrome
    d.rectangle([0, 0, W, 92], fill=(222, 225, 230))
    tabs = [
        ("Ridge Trails \u2013 Plan your hike", True),
        ("Weather forecast \u2013 7 days", False),
        ("Trail map PDF", False),
    ]
    tx = 80
    for name, active in tabs:
        wtab = 300
        d.rounded_rectangle(
            [tx, 8, tx + wtab, 50], radius=8, fill="white" if active else (210, 213, 218)
        )
        d.text((tx + 16, 19), name, font=font("sans", 15), fill=(40, 40, 45))
        d.text((tx + wtab - 26, 17), "\u00d7", font=font("sans", 17), fill=(100, 100, 105))
        tx += wtab + 6
    d.text((tx + 10, 14), "+", font=font("sans", 24), fill=(80, 80, 85))
    for i, c in enumerate([(255, 95, 87), (254, 188, 46), (40, 200, 64)]):
        d.ellipse([14 + i * 20, 22, 26 + i * 20, 34], fill=c)
    d.rectangle([0, 46, W, 92], fill="white")
    for i, s in enumerate(["\u2190", "\u2192", "\u21bb"]):
        d.text((18 + i * 36, 56), s, font=font("sans", 20), fill=(90, 90, 95))
    d.rounded_rectangle([140, 53, W - 140, 86], radius=16, fill=(241, 243, 244))
    d.text((160, 60), "\u25cf", font=font("sans", 12), fill=(60, 150, 60))
    d.text(
        (180, 58),
        "https://www.ridgetrails.example/trails/north-cascades?season=autumn",
        font=font("sans", 17),
        fill=(40, 40, 45),
    )
    text_right(d, W - 20, 58, "\u2630", font("sans", 20), (90, 90, 95))
    d.line([(0, 92), (W, 92)], fill=(200, 200, 205))
    # site header
    y0 = 93
    d.rectangle([0, y0, W, y0 + 70], fill=(28, 58, 44))
    d.polygon([(60, y0 + 52), (82, y0 + 18), (104, y0 + 52)], fill=(170, 220, 120))
    d.text((118, y0 + 18), "RIDGE TRAILS", font=font("sans-bold", 28), fill="white")
    nx = 700
    for item in ["Trails", "Maps", "Conditions", "Gear guide", "Community", "Donate"]:
        d.text((nx, y0 + 24), item, font=font("default", 20), fill=(230, 240, 230))
        nx += tw(font("default", 20), item) + 44
    # hero
    hero_h = 330
    hero = mountains(
        (W, hero_h),
        random.Random(rng.random()),
        (120, 170, 210),
        (250, 205, 160),
        [(95, 110, 140), (60, 90, 80), (35, 60, 45)],
    )
    img.paste(hero, (0, y0 + 70))
    hy = y0 + 70
    d.text(
        (90, hy + 70),
        "North Cascades in autumn",
        font=font("sans-bold", 52),
        fill="white",
        stroke_width=2,
        stroke_fill=(30, 40, 40),
    )
    d.text(
        (92, hy + 145),
        "38 trails \u00b7 412 km \u00b7 updated 2 days ago",
        font=font("sans", 24),
        fill="white",
        stroke_width=1,
        stroke_fill=(30, 40, 40),
    )
    d.rounded_rectangle([90, hy + 210, 330, hy + 264], radius=27, fill=(242, 140, 40))
    text_center(d, 210, hy + 237, "Find a trail  \u2192", font("sans-bold", 20), "white")
    # search filter bar
    y = hy + hero_h + 24
    fl = font("sans", 17)
    for i, (lab, val) in enumerate(
        [
            ("Difficulty", "Moderate"),
            ("Length", "5\u201315 km"),
            ("Dogs", "Allowed"),
            ("Sort by", "Most popular"),
        ]
    ):
        x = 90 + i * 250
        d.rounded_rectangle(
            [x, y, x + 230, y + 40], radius=6, outline=(200, 200, 205), fill=(250, 250, 250)
        )
        d.text((x + 12, y + 10), f"{lab}: {val}  \u25be", font=fl, fill=(50, 50, 55))
    text_right(d, W - 90, y + 10, "Showing 1\u20133 of 38", fl, (110, 110, 115))
    # cards
    y += 66
    cards = [
        (
            "Maple Pass Loop",
            "11.6 km \u00b7 +640 m \u00b7 Moderate",
            "Larches turn gold in early October; " "the loop is best hiked counter-clockwise.",
            4.8,
            1290,
        ),
        (
            "Blue Lake",
            "7.1 km \u00b7 +320 m \u00b7 Easy",
            "A short forest walk to a turquoise lake below " "Liberty Bell Mountain.",
            4.6,
            2033,
        ),
        (
            "Cascade Pass",
            "11.9 km \u00b7 +540 m \u00b7 Moderate",
            "Switchbacks lead to a meadow with views of " "glaciers and wildlife.",
            4.9,
            1711,
        ),
    ]
    cw = (W - 180 - 2 * 30) / 3
    for i, (name, stats, desc, rating, reviews) in enumerate(cards):
        x = 90 + i * (cw + 30)
        d.rounded_rectangle(
            [x, y, x + cw, H + 20], radius=10, fill="white", outline=(215, 215, 220)
        )
        thumb = mountains(
            (int(cw) - 2, 120),
            random.Random(i * 7 + 3),
            [(150, 190, 220), (200, 160, 200), (120, 200, 230)][i],
            (240, 230, 210),
            [(110, 120, 150), (70, 100, 80)],
        )
        img.paste(thumb, (int(x) + 1, y + 1))
        d.text((x + 18, y + 134), name, font=font("sans-bold", 22), fill=(25, 25, 30))
        text_right(
            d,
            x + cw - 18,
            y + 136,
            f"\u2605 {rating}  ({reviews:,})",
            font("sans", 16),
            (200, 130, 20),
        )
        d.text((x + 18, y + 166), stats, font=font("sans", 16), fill=(100, 100, 105))
        paragraph(
            d, x + 18, y + 196, desc, font("default", 17), cw - 36, fill=(50, 50, 55), leading=1.4
        )
        tx_ = x + 18
        for tag in [
            ["Loop", "Dogs on leash", "Parking"],
            ["Family", "Lake", "Toilets"],
            ["Glacier views", "Permit", "Steep"],
        ][i]:
            tl_ = tw(font("sans", 14), tag)
            d.rounded_rectangle(
                [tx_, y + 262, tx_ + tl_ + 20, y + 288], radius=13, fill=(232, 242, 234)
            )
            d.text((tx_ + 10, y + 266), tag, font=font("sans", 14), fill=(40, 90, 60))
            tx_ += tl_ + 30
    return img


# --------------------------------------------------------------------------------------------
# Scene text
# --------------------------------------------------------------------------------------------


def gaussian_noise(size: tuple[int, int], sigma: float, rng: random.Random) -> Image.Image:
    """Mode-L gaussian noise around 128 drawn from ``rng`` (reproducible, unlike effect_noise)."""
    w, h = size
    gauss = rng.gauss
    data = bytes(max(0, min(255, int(128.5 + gauss(0.0, sigma)))) for _ in range(w * h))
    return Image.frombytes("L", (w, h), data)


def noise_texture(
    size, base, amp: int, rng: random.Random, blur: float = 1.0, streak: bool = False
) -> Image.Image:
    """A cheap procedural texture from gaussian noise, optionally stretched into vertical grain."""
    w, h = size
    if streak:  # vertical grain: noise stretched along y
        n = gaussian_noise((w, max(1, h // 16)), amp, rng).resize((w, h), Image.Resampling.BICUBIC)
    else:
        n = gaussian_noise((w, h), amp, rng)
    n = n.filter(ImageFilter.GaussianBlur(blur))
    lut = []
    for ch in base:
        lut += [max(0, min(255, ch + (v - 128) * ch // 200)) for v in range(256)]
    return Image.merge("RGB", (n, n, n)).point(lut)


def perspective_coeffs(src, dst):
    """Coefficients for Image.transform(PERSPECTIVE) mapping points dst to src."""
    # solve the 8x8 linear system with Gaussian elimination (no numpy needed)
    A, B = [], []
    for (x, y), (u, v) in zip(dst, src):
        A.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        B.append(u)
        A.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        B.append(v)
    n = 8
    M = [row[:] + [b] for row, b in zip(A, B)]
    for c in range(n):
        p = max(range(c, n), key=lambda i: abs(M[i][c]))
        M[c], M[p] = M[p], M[c]
        for i in range(n):
            if i != c:
                f = M[i][c] / M[c][c]
                for j in range(c, n + 1):
                    M[i][j] -= f * M[c][j]
    return [M[i][n] / M[i][i] for i in range(n)]


def warp_onto(canvas: Image.Image, sign: Image.Image, quad) -> None:
    """Paste an RGBA sign into the canvas so that its corners land on quad (tl, tr, br, bl)."""
    w, h = sign.size
    coeffs = perspective_coeffs([(0, 0), (w, 0), (w, h), (0, h)], quad)
    warped = sign.transform(
        canvas.size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC
    )
    canvas.paste(warped, (0, 0), warped)


def scene_text_street(rng: random.Random) -> Image.Image:
    W, H = 1024, 768
    img = vgradient((W, H), (120, 165, 215), (205, 225, 240))
    clouds = Image.new("L", (W, H), 0)
    cd = ImageDraw.Draw(clouds)
    for _ in range(7):
        cx_, cy_ = rng.uniform(0, 560), rng.uniform(20, 320)
        for _ in range(5):
            rx_, ry_ = rng.uniform(40, 90), rng.uniform(18, 34)
            ox_, oy_ = rng.uniform(-60, 60), rng.uniform(-12, 12)
            cd.ellipse(
                [cx_ + ox_ - rx_, cy_ + oy_ - ry_, cx_ + ox_ + rx_, cy_ + oy_ + ry_], fill=200
            )
    clouds = clouds.filter(ImageFilter.GaussianBlur(14))
    img = Image.composite(Image.new("RGB", (W, H), (250, 250, 252)), img, clouds)
    d = ImageDraw.Draw(img)
    # brick building on the right
    bx0 = 560
    wall = noise_texture((W - bx0, H), (150, 78, 60), 40, rng, blur=1.2)
    wd = ImageDraw.Draw(wall)
    for row_i, yy in enumerate(range(0, H, 26)):
        wd.line([(0, yy), (W, yy)], fill=(200, 190, 175), width=3)
        off = 0 if row_i % 2 else 30
        for xx in range(-off, W, 60):
            wd.line([(xx, yy), (xx, yy + 26)], fill=(200, 190, 175), width=3)
    img.paste(wall, (bx0, 0))
    # shop window and awning
    d.rectangle([bx0 + 60, 420, W - 40, 700], fill=(40, 55, 65))
    d.rectangle([bx0 + 70, 430, W - 50, 690], fill=(80, 110, 125))
    d.line([(bx0 + 245, 430), (bx0 + 245, 690)], fill=(40, 55, 65), width=8)
    for i in range(8):
        col = (190, 40, 40) if i % 2 == 0 else (245, 240, 230)
        x0 = bx0 + 40 + i * ((W - bx0 - 40) / 8)
        d.polygon(
            [
                (x0, 340),
                (x0 + (W - bx0 - 40) / 8, 340),
                (x0 + (W - bx0 - 40) / 8 + 6, 400),
                (x0 + 6, 400),
            ],
            fill=col,
        )
    # shop fascia sign
    d.rectangle([bx0 + 40, 250, W - 20, 330], fill=(25, 45, 35))
    fsz = 42
    while tw(font("serif-bold", fsz), "HARBOUR BAKERY") > (W - 20) - (bx0 + 40) - 40:
        fsz -= 1
    text_center(
        d, (bx0 + 40 + W - 20) / 2, 282, "HARBOUR BAKERY", font("serif-bold", fsz), (235, 205, 130)
    )
    text_center(
        d,
        (bx0 + 40 + W - 20) / 2,
        316,
        "BREAD \u00b7 COFFEE \u00b7 CAKES  since 1962",
        font("serif", 16),
        (235, 205, 130),
    )
    # opening hours sticker on the glass
    d.rounded_rectangle([bx0 + 275, 470, bx0 + 420, 620], radius=6, fill=(250, 250, 245))
    fh = font("cond-bold", 15)
    fh2 = font("cond", 14)
    d.text((bx0 + 287, 478), "OPEN", font=font("sans-bold", 26), fill=(20, 120, 60))
    yy = 514
    for day, hrs in [("Mon\u2013Fri", "7\u201318"), ("Sat", "8\u201316"), ("Sun", "closed")]:
        d.text((bx0 + 287, yy), day, font=fh, fill=(30, 30, 30))
        text_right(d, bx0 + 410, yy, hrs, fh2, (30, 30, 30))
        yy += 24
    # pavement
    d.polygon([(0, 700), (W, 700), (W, H), (0, H)], fill=(150, 150, 150))
    d.rectangle([0, 690, W, 702], fill=(190, 190, 190))
    # pole
    px = 300
    d.rectangle([px - 9, 110, px + 9, 705], fill=(95, 100, 105))
    d.rectangle([px - 4, 110, px - 1, 705], fill=(140, 145, 150))
    # green street-name blade in perspective
    blade = Image.new("RGBA", (620, 120), (0, 0, 0, 0))
    bd = ImageDraw.Draw(blade)
    bd.rounded_rectangle([0, 0, 619, 119], radius=14, fill=(0, 110, 70), outline="white", width=5)
    bd.text((28, 14), "Maple", font=font("sans-bold", 72), fill="white")
    ave_x = 28 + tw(font("sans-bold", 72), "Maple") + 14
    bd.text((ave_x, 27), "Ave", font=font("sans-bold", 56), fill="white")
    bd.line([(472, 22), (472, 98)], fill="white", width=3)
    text_center(bd, 546, 46, "400", font("sans-bold", 40), "white")
    text_center(bd, 546, 86, "BLOCK", font("sans-bold", 24), "white")
    warp_onto(img, blade, [(60, 120), (520, 150), (520, 232), (60, 226)])
    # second blade, rotated the other way
    blade2 = Image.new("RGBA", (520, 100), (0, 0, 0, 0))
    bd2 = ImageDraw.Draw(blade2)
    bd2.rounded_rectangle([0, 0, 519, 99], radius=12, fill=(0, 110, 70), outline="white", width=5)
    bd2.text((30, 10), "Harbor St", font=font("sans-bold", 64), fill="white")
    warp_onto(img, blade2, [(250, 245), (420, 238), (420, 300), (250, 310)])
    # stop sign lower on the pole
    stop = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    sd = ImageDraw.Draw(stop)
    oct_pts = [
        (
            150 + 148 * math.cos(math.radians(22.5 + 45 * k)),
            150 + 148 * math.sin(math.radians(22.5 + 45 * k)),
        )
        for k in range(8)
    ]
    sd.polygon(oct_pts, fill="white")
    oct_in = [
        (
            150 + 136 * math.cos(math.radians(22.5 + 45 * k)),
            150 + 136 * math.sin(math.radians(22.5 + 45 * k)),
        )
        for k in range(8)
    ]
    sd.polygon(oct_in, fill=(200, 20, 30))
    text_center(sd, 150, 150, "STOP", font("sans-bold", 88), "white")
    warp_onto(img, stop, [(205, 360), (395, 372), (390, 560), (200, 552)])
    # a small parking plate
    plate = Image.new("RGBA", (200, 260), (0, 0, 0, 0))
    pd = ImageDraw.Draw(plate)
    pd.rectangle([0, 0, 199, 259], fill="white", outline=(30, 30, 30), width=4)
    text_center(pd, 100, 70, "P", font("sans-bold", 100), (20, 60, 160))
    text_center(pd, 100, 150, "2 HOUR", font("sans-bold", 30), (20, 60, 160))
    text_center(pd, 100, 190, "8AM\u20136PM", font("sans", 24), (20, 20, 20))
    text_center(pd, 100, 225, "MON\u2013SAT", font("sans", 24), (20, 20, 20))
    warp_onto(img, plate, [(312, 580), (392, 586), (390, 688), (310, 684)])
    return img.filter(ImageFilter.GaussianBlur(0.5))


def scene_text_label(rng: random.Random) -> Image.Image:
    W, H = 800, 1000
    # wooden table texture
    wood = noise_texture((W, H), (160, 110, 70), 45, rng, blur=1.5, streak=True)
    wd = ImageDraw.Draw(wood)
    for _ in range(70):  # darker grain lines, slightly wavy
        x = rng.uniform(0, W)
        amp_, per = rng.uniform(2, 9), rng.uniform(150, 400)
        pts = [(x + amp_ * math.sin(yy / per * 2 * math.pi), yy) for yy in range(0, H + 20, 20)]
        wd.line(pts, fill=(125, 82, 50), width=rng.choice([1, 1, 2]))
    for x in (0, 265, 530, 795):  # plank joints
        wd.line([(x, 0), (x, H)], fill=(70, 42, 25), width=4)
    img = wood.filter(ImageFilter.GaussianBlur(0.8))
    # jar label
    LW, LH = 520, 700
    label = Image.new("RGBA", (LW, LH), (0, 0, 0, 0))
    ld = ImageDraw.Draw(label)
    ld.rounded_rectangle(
        [0, 0, LW - 1, LH - 1], radius=26, fill=(248, 240, 215), outline=(120, 80, 20), width=6
    )
    ld.rounded_rectangle([16, 16, LW - 17, LH - 17], radius=18, outline=(190, 140, 40), width=2)
    ink = (70, 45, 15)
    text_center(ld, LW / 2, 70, "HILLSIDE APIARY", font("serif", 26), ink)
    # hexagon emblem
    cx, cy, r = LW / 2, 160, 56
    hexa = [
        (cx + r * math.cos(math.radians(60 * k)), cy + r * math.sin(math.radians(60 * k)))
        for k in range(6)
    ]
    ld.polygon(hexa, fill=(235, 170, 40), outline=ink)
    text_center(ld, cx, cy, "\u2740", font("sans", 50), ink)
    text_center(ld, LW / 2, 262, "Wildflower", font("serif-italic", 58), ink)
    text_center(ld, LW / 2, 330, "HONEY", font("serif-bold", 72), (150, 90, 10))
    text_center(ld, LW / 2, 385, "RAW \u00b7 UNFILTERED \u00b7 LOCAL", font("sans-bold", 20), ink)
    ld.line([(60, 415), (LW - 60, 415)], fill=(190, 140, 40), width=2)
    fs = font("sans", 17)
    y = 430
    y = paragraph(
        ld,
        50,
        y,
        "Ingredients: 100% pure honey, harvested in July from hives on the "
        "Calder Valley hillsides. May crystallise naturally; warm gently to liquefy. "
        "Not suitable for infants under 12 months.",
        fs,
        LW - 100,
        fill=ink,
        leading=1.4,
    )
    y += 14
    ld.text((50, y), "Net Wt 12 oz (340 g)", font=font("sans-bold", 22), fill=ink)
    y += 40
    ld.text((50, y), "Best before: 08/2026", font=font("mono", 18), fill=ink)
    ld.text((50, y + 26), "LOT 24-117", font=font("mono", 18), fill=ink)
    barcode(
        ld, LW - 230, y - 6, 170, 60, rng, digits="5 061234 117248", f=font("mono", 14), fill=ink
    )
    y += 92
    text_center(
        ld, LW / 2, y, "hillsideapiary.example  \u00b7  Todmorden, UK", font("sans-italic", 15), ink
    )
    # slight wrinkle shading on the label
    shade = Image.new("L", (LW, LH), 0)
    sdraw = ImageDraw.Draw(shade)
    for _k in range(6):
        x = rng.uniform(40, LW - 40)
        sdraw.line([(x, 0), (x + rng.uniform(-30, 30), LH)], fill=30, width=rng.choice([8, 14, 20]))
    shade = shade.filter(ImageFilter.GaussianBlur(12))
    dark_layer = Image.new("RGBA", (LW, LH), (60, 40, 10, 0))
    dark_layer.putalpha(Image.composite(shade, Image.new("L", (LW, LH), 0), label.getchannel("A")))
    label = Image.alpha_composite(label, dark_layer)
    label = label.rotate(-4.5, expand=True, resample=Image.Resampling.BICUBIC)
    # drop shadow
    pad = 40
    sh_a = Image.new("L", (label.width + 2 * pad, label.height + 2 * pad), 0)
    sh_a.paste(label.getchannel("A").point(lambda a: a * 110 // 255), (pad, pad))
    sh = Image.new("RGBA", sh_a.size, (0, 0, 0, 0))
    sh.putalpha(sh_a.filter(ImageFilter.GaussianBlur(12)))
    ox, oy = (W - label.width) // 2, (H - label.height) // 2 - 10
    img.paste(sh, (ox + 14 - pad, oy + 18 - pad), sh)
    img.paste(label, (ox, oy), label)
    # warm light falloff toward the corners
    vign = Image.new("L", (W, H), 0)
    vd = ImageDraw.Draw(vign)
    vd.ellipse([-200, -150, W + 200, H + 150], fill=255)
    vign = vign.filter(ImageFilter.GaussianBlur(120))
    img = Image.composite(img, Image.new("RGB", (W, H), (40, 25, 15)), vign)
    return img


# --------------------------------------------------------------------------------------------
# Diagrams and tables
# --------------------------------------------------------------------------------------------


def diagram_flowchart(rng: random.Random) -> Image.Image:
    S = 2
    W, H = 1400, 1000
    img = Image.new("RGB", (W * S, H * S), (252, 252, 250))
    d = ImageDraw.Draw(img)

    def s(v):
        return v * S

    text_center(
        d,
        s(W / 2),
        s(46),
        "Image preprocessing for the vision encoder",
        font("sans-bold", s(30)),
        (30, 30, 35),
    )
    fnode = font("sans", s(19))
    fnodeb = font("sans-bold", s(19))
    blue, blue_o = (222, 235, 250), (60, 110, 170)
    green, green_o = (222, 245, 225), (60, 140, 80)
    amber, amber_o = (253, 240, 210), (190, 130, 30)

    def box(cx, cy, w, h, lines, fill=blue, outline=blue_o, radius=12):
        d.rounded_rectangle(
            [s(cx - w / 2), s(cy - h / 2), s(cx + w / 2), s(cy + h / 2)],
            radius=s(radius),
            fill=fill,
            outline=outline,
            width=s(2),
        )
        n = len(lines)
        for i, ln in enumerate(lines):
            text_center(
                d,
                s(cx),
                s(cy + (i - (n - 1) / 2) * 26),
                ln,
                fnodeb if i == 0 else fnode,
                (25, 25, 30),
            )

    def diamond(cx, cy, w, h, lines):
        d.polygon(
            [
                (s(cx), s(cy - h / 2)),
                (s(cx + w / 2), s(cy)),
                (s(cx), s(cy + h / 2)),
                (s(cx - w / 2), s(cy)),
            ],
            fill=amber,
            outline=amber_o,
            width=s(2),
        )
        n = len(lines)
        for i, ln in enumerate(lines):
            text_center(d, s(cx), s(cy + (i - (n - 1) / 2) * 25), ln, fnode, (25, 25, 30))

    def arr(p0, p1, label=None, lpos=None):
        arrow(
            d, (s(p0[0]), s(p0[1])), (s(p1[0]), s(p1[1])), fill=(70, 70, 75), width=s(2), head=s(13)
        )
        if label:
            lx, ly = lpos
            d.text((s(lx), s(ly)), label, font=font("sans-bold", s(17)), fill=(90, 90, 95))

    def poly_arrow(pts, label=None, lpos=None):
        for a, b in zip(pts[:-2], pts[1:-1]):
            d.line([(s(a[0]), s(a[1])), (s(b[0]), s(b[1]))], fill=(70, 70, 75), width=s(2))
        arr(pts[-2], pts[-1], label, lpos)

    cx = 420
    # start
    d.ellipse([s(cx - 110), s(95), s(cx + 110), s(155)], fill=green, outline=green_o, width=s(2))
    text_center(d, s(cx), s(125), "Input image (RGB)", fnodeb, (25, 25, 30))
    arr((cx, 155), (cx, 195))
    box(cx, 235, 300, 80, ["Decode & convert", "EXIF rotate, drop alpha"])
    arr((cx, 275), (cx, 315))
    diamond(cx, 390, 300, 150, ["Longest side", "> 512 px?"])
    # yes branch -> right
    rx = 900
    poly_arrow([(cx + 150, 390), (rx - 160, 390)], "Yes", (cx + 165, 360))
    box(
        rx,
        390,
        320,
        100,
        ["Resize longest side to", "a multiple of 512 px", "(max 4 \u00d7 512 = 2048)"],
    )
    arr((rx, 440), (rx, 500))
    box(
        rx,
        550,
        320,
        100,
        ["Split into 512 \u00d7 512", "tiles, row-major", "e.g. 3 \u00d7 4 = 12 tiles"],
    )
    arr((rx, 600), (rx, 660))
    box(rx, 700, 320, 80, ["Add global view", "whole image at 512 \u00d7 512"])
    # no branch -> down
    arr((cx, 465), (cx, 520), "No", (cx + 14, 478))
    box(cx, 560, 300, 80, ["Resize to 512 \u00d7 512", "single tile"])
    # merge
    arr((cx, 600), (cx, 790))
    poly_arrow([(rx, 740), (rx, 830), (cx + 150, 830)])
    box(
        cx,
        830,
        300,
        80,
        ["Rescale & normalise", "x / 255, mean 0.5, std 0.5"],
        fill=(236, 230, 248),
        outline=(120, 90, 170),
    )
    arr((cx, 870), (cx, 905))
    d.ellipse([s(cx - 130), s(905), s(cx + 130), s(965)], fill=green, outline=green_o, width=s(2))
    text_center(d, s(cx), s(935), "Tiles \u2192 vision encoder", fnodeb, (25, 25, 30))
    # legend / notes box
    nx, ny = 1120, 100
    d.rounded_rectangle(
        [s(nx), s(ny), s(nx + 250), s(ny + 200)],
        radius=s(8),
        fill="white",
        outline=(200, 200, 205),
        width=s(1),
    )
    d.text((s(nx + 14), s(ny + 12)), "Legend", font=font("sans-bold", s(18)), fill=(40, 40, 45))
    for i, (lab, f_, o_) in enumerate(
        [
            ("Start / end", green, green_o),
            ("Processing step", blue, blue_o),
            ("Decision", amber, amber_o),
            ("Normalisation", (236, 230, 248), (120, 90, 170)),
        ]
    ):
        yy = ny + 50 + i * 36
        d.rectangle([s(nx + 14), s(yy), s(nx + 44), s(yy + 22)], fill=f_, outline=o_, width=s(2))
        d.text((s(nx + 56), s(yy)), lab, font=font("sans", s(17)), fill=(40, 40, 45))
    ny2 = ny + 240
    d.text((s(nx), s(ny2)), "Notes", font=font("sans-bold", s(18)), fill=(40, 40, 45))
    notes = [
        "1. Each 512 \u00d7 512 tile becomes 64 image tokens after pixel shuffle.",
        "2. Both sides are rounded up to a multiple of 512 px.",
        "3. The global view lets the model see the whole layout.",
    ]
    yy = ny2 + 34
    for n_ in notes:
        yy = (
            paragraph(
                d, s(nx), s(yy), n_, font("sans", s(16)), s(250), fill=(70, 70, 75), leading=1.35
            )
            / S
            + 8
        )
    dashed_line(
        d, (s(700), s(470)), (s(700), s(760)), fill=(150, 150, 155), width=s(1), dash=s(8), gap=s(6)
    )
    rotated_text(
        img, (s(680), s(615)), "image splitting", font("sans-italic", s(17)), (120, 120, 125), 90
    )
    return img.resize((W, H), Image.Resampling.LANCZOS)


def diagram_table(rng: random.Random) -> Image.Image:
    W, H = 1280, 960
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    m = 60
    d.text(
        (m, 36),
        "Table 2. Single-board computers evaluated",
        font=font("serif-bold", 30),
        fill=(20, 20, 25),
    )
    d.text(
        (m, 80),
        "Measured at 25 \u00b0C ambient with passive cooling; prices are list prices in USD.",
        font=font("serif-italic", 18),
        fill=(90, 90, 95),
    )
    headers = [
        "Board",
        "SoC",
        "CPU",
        "NPU\n(TOPS)",
        "RAM",
        "Idle\n(W)",
        "Load\n(W)",
        "PCIe",
        "Price",
    ]
    fracs = [0.15, 0.12, 0.17, 0.09, 0.10, 0.08, 0.08, 0.08, 0.13]
    rows = [
        [
            "Orion X5",
            "OX-3588",
            "4\u00d7A76 + 4\u00d7A55",
            "6.0",
            "16 GB",
            "3.1",
            "9.8",
            "\u2713",
            "$189",
        ],
        [
            "Orion X5 Lite",
            "OX-3588S",
            "4\u00d7A76 + 4\u00d7A55",
            "6.0",
            "8 GB",
            "2.9",
            "9.1",
            "\u2717",
            "$139",
        ],
        [
            "Lyra 4B",
            "LY-3576",
            "4\u00d7A72 + 4\u00d7A53",
            "6.0",
            "8 GB",
            "2.2",
            "7.4",
            "\u2713",
            "$119",
        ],
        ["Kestrel Mini", "KS-3566", "4\u00d7A55", "0.8", "4 GB", "1.4", "4.2", "\u2717", "$59"],
        ["Kestrel Pro", "KS-3568", "4\u00d7A55", "1.0", "8 GB", "1.8", "5.0", "\u2713", "$89"],
        ["Vega Edge", "VG-1106", "1\u00d7A7", "0.5", "256 MB", "0.4", "0.9", "\u2717", "$24"],
        [
            "Nimbus 8",
            "NB-3588",
            "4\u00d7A76 + 4\u00d7A55",
            "6.0",
            "32 GB",
            "3.6",
            "11.2",
            "\u2713",
            "$269",
        ],
    ]
    tl = m
    tr = W - m
    tw_ = tr - tl
    y = 140
    hh = 70
    d.rectangle([tl, y, tr, y + hh], fill=(38, 70, 110))
    fh = font("sans-bold", 18)
    cx = tl
    for h_, f_ in zip(headers, fracs):
        lines = h_.split("\n")
        for i, ln in enumerate(lines):
            text_center(
                d, cx + f_ * tw_ / 2, y + hh / 2 + (i - (len(lines) - 1) / 2) * 24, ln, fh, "white"
            )
        cx += f_ * tw_
    y += hh
    rh = 54
    fr = font("sans", 18)
    best = {3: "6.0", 5: "0.4"}
    for ri, row in enumerate(rows):
        fill = (244, 247, 251) if ri % 2 else "white"
        d.rectangle([tl, y, tr, y + rh], fill=fill)
        cx = tl
        for ci, (v, f_) in enumerate(zip(row, fracs)):
            col = (25, 25, 30)
            fnt = fr
            if ci == 0:
                fnt = font("sans-bold", 18)
            if ci == 7:
                col = (30, 140, 60) if v == "\u2713" else (200, 50, 50)
                fnt = font("sans-bold", 24)
            if ci in best and v == best[ci]:
                fnt = font("sans-bold", 18)
                col = (20, 90, 160)
            if ci == 0:
                d.text((cx + 12, y + rh / 2 - 11), v, font=fnt, fill=col)
            else:
                text_center(d, cx + f_ * tw_ / 2, y + rh / 2, v, fnt, col)
            cx += f_ * tw_
        y += rh
        d.line([(tl, y), (tr, y)], fill=(215, 220, 228), width=1)
    # column separators
    cx = tl
    for f_ in fracs[:-1]:
        cx += f_ * tw_
        d.line([(cx, 140 + hh), (cx, y)], fill=(225, 228, 235), width=1)
    d.rectangle([tl, 140, tr, y], outline=(38, 70, 110), width=2)
    y += 24
    fn = font("sans", 16)
    notes = [
        "\u2713 = M.2 / PCIe slot available; \u2717 = none.  Highest NPU throughput and lowest idle power in blue.",
        "Load power measured while running the int8 vision encoder continuously for 10 minutes.",
        "All boards and figures are fictional and used only as sample content.",
    ]
    for n_ in notes:
        d.text((tl, y), n_, font=fn, fill=(80, 80, 85))
        y += 28
    # small inline bar sparkline for load power
    y += 24
    d.text((tl, y), "Load power (W)", font=font("sans-bold", 18), fill=(40, 40, 45))
    y += 34
    maxw = 11.2
    for i, row in enumerate(rows):
        v = float(row[6])
        bx = tl + 160
        d.text((tl, y), row[0], font=font("sans", 15), fill=(60, 60, 65))
        d.rectangle([bx, y + 2, bx + v / maxw * 520, y + 16], fill=PALETTE[i % len(PALETTE)])
        d.text((bx + v / maxw * 520 + 8, y), f"{v:.1f}", font=font("sans", 15), fill=(60, 60, 65))
        y += 22
    return img


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------

# (file name, generator, palette colours for PNG quantisation or None for full RGB)
GENERATORS: list[tuple[str, Callable[[random.Random], Image.Image], int | None]] = [
    ("doc_report_page_a4.png", doc_report_page, None),
    ("doc_book_page.png", doc_book_page, None),
    ("doc_form_membership_application.png", doc_form, None),
    ("doc_receipt_grocery.png", doc_receipt, None),
    ("doc_invoice_table.png", doc_invoice, None),
    ("doc_scanned_memo.png", doc_scanned_memo, None),
    ("chart_bar_grouped_revenue.png", chart_bar, None),
    ("chart_line_temperature.png", chart_line, None),
    ("chart_pie_energy_use.png", chart_pie, None),
    ("chart_scatter_fuel_economy.png", chart_scatter, None),
    ("screen_terminal.png", screen_terminal, None),
    ("screen_settings_dialog.png", screen_settings, None),
    ("screen_web_page.png", screen_web, None),
    ("scene_text_street_signs.png", scene_text_street, None),
    ("scene_text_honey_label.png", scene_text_label, None),
    ("diagram_flowchart_preprocessing.png", diagram_flowchart, None),
    ("diagram_table_board_comparison.png", diagram_table, None),
]


def seed_for(name: str) -> int:
    return BASE_SEED ^ zlib.crc32(name.encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    ap.add_argument(
        "--only", nargs="*", default=None, help="generate only these file names (or name prefixes)"
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if _find_font_file(FONT_FILES["sans"]) is None:
        print(
            "warning: DejaVu fonts not found; using Pillow's default font (output will differ "
            "from the committed images)",
            file=sys.stderr,
        )
    total = 0
    for name, fn, colors in GENERATORS:
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        rng = random.Random(seed_for(name))
        img = fn(rng)
        path = args.out / name
        save_png(img, path, colors)
        size = path.stat().st_size
        total += size
        print(f"{name:45s} {img.width:5d}x{img.height:<5d} {size / 1024:8.1f} KiB")
    print(f"{'total':45s} {'':11s} {total / 1024:8.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
