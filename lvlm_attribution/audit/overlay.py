"""The per-item picture: the image, then one panel per method with its heatmap over the image,
a caption per panel with the method's raw value range, a colour scale, and a legend. Pillow only.

Each method's map is scaled to its own [min, max] before colouring (methods are on different
scales), so the colour bar reads 0 = the method's minimum, 1 = its maximum; the caption under each
panel gives that raw range. The blending is `lvlm_attribution.heatmaps.overlay_image`, the same
rendering the service returns for `heatmaps.overlay`: a map covers only the region of the image
the model saw (the record's `visual_box`; LLaVA's processor crops the central square), and the
rest of the image is dimmed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import heatmaps

PANEL = 224  # longer side of each panel, pixels
MARGIN = 16
GAP = 14
BAR_W = 18
BAR_LABEL_W = 150
ALPHA = 0.55
INK = (20, 20, 20)
MUTED = (90, 90, 90)
PAPER = (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def panel_image(image: Image.Image, panel: int = PANEL) -> Image.Image:
    """The image scaled so its longer side is `panel` (pixel-crisp when enlarging)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = panel / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def render_overlay(image: Image.Image, maps: Mapping[str, np.ndarray], title: str = "",
                   subtitle: str = "", panel: int = PANEL,
                   box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The composite picture (RGB) described in the module docstring; `box` is the region of
    `image` the maps cover (None: all of it)."""
    base = panel_image(image, panel)
    panel_box = heatmaps.scale_box(box, image.size, base.size)
    pw, ph = base.size
    f_title, f_text, f_small = _font(16), _font(13), _font(11)
    panels: list[tuple[str, str, Image.Image]] = [("input image", f"{image.size[0]}x"
                                                   f"{image.size[1]} px", base)]
    for name, values in maps.items():
        grid = np.nan_to_num(np.asarray(values, dtype=np.float32))
        lo, hi = float(grid.min()), float(grid.max())
        blended = heatmaps.overlay_image(base, grid, box=panel_box, alpha=ALPHA)
        caption = (f"{grid.shape[0]}x{grid.shape[1]} grid, raw {lo:.3g} .. {hi:.3g}"
                   if hi > lo else f"{grid.shape[0]}x{grid.shape[1]} grid, constant {lo:.3g}")
        panels.append((name, caption, blended))

    n = len(panels)
    width = MARGIN * 2 + n * pw + (n - 1) * GAP + GAP + BAR_W + BAR_LABEL_W
    title_h = 28 + (20 if subtitle else 0)
    caption_h = 40
    legend_h = 40
    height = MARGIN + title_h + ph + caption_h + legend_h + MARGIN
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    inner = width - 2 * MARGIN
    y = MARGIN
    if title:
        draw.text((MARGIN, y), _fit(draw, title, f_title, inner), fill=INK, font=f_title)
    if subtitle:
        draw.text((MARGIN, y + 24), _fit(draw, subtitle, f_text, inner), fill=MUTED, font=f_text)
    y += title_h

    x = MARGIN
    for name, caption, pic in panels:
        canvas.paste(pic, (x, y))
        draw.rectangle([x - 1, y - 1, x + pw, y + ph], outline=(160, 160, 160))
        draw.text((x, y + ph + 6), _fit(draw, name, f_text, pw), fill=INK, font=f_text)
        draw.text((x, y + ph + 23), _fit(draw, caption, f_small, pw), fill=MUTED, font=f_small)
        x += pw + GAP

    # Colour scale: the colormap used for every heatmap panel, top = method max.
    bar = heatmaps.colormap(np.linspace(1.0, 0.0, ph)[:, None].repeat(BAR_W, axis=1))
    canvas.paste(Image.fromarray(bar, mode="RGB"), (x, y))
    draw.rectangle([x - 1, y - 1, x + BAR_W, y + ph], outline=(120, 120, 120))
    lx = x + BAR_W + 6
    for frac, label in ((0.0, "1.0  method max"), (0.5, "0.5"), (1.0, "0.0  method min")):
        ty = y + round(frac * (ph - 1))
        draw.line([x + BAR_W, ty, x + BAR_W + 4, ty], fill=INK)
        draw.text((lx, min(max(ty - 7, y), y + ph - 14)), label, fill=INK, font=f_small)
    draw.text((lx, y + ph // 2 + 14), "relative attribution", fill=MUTED, font=f_small)

    legend_y = y + ph + caption_h + 4
    legend = ("Heatmaps: each method's map, scaled to its own min..max, coloured dark (low) to "
              f"pale yellow (high) and blended {int(ALPHA * 100)}% over the image.")
    draw.text((MARGIN, legend_y), _fit(draw, legend, f_small, inner), fill=MUTED, font=f_small)
    draw.text((MARGIN, legend_y + 16), _fit(draw, "Bright = the region the method says the "
                                            "answer relied on; compare panels, not absolute "
                                            "colours across methods.", f_small, inner),
              fill=MUTED, font=f_small)
    return canvas


def png_bytes(picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
