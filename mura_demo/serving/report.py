"""The one-page report: the radiographs, their maps, the reading and the disclaimer on one page.

Drawn with Pillow alone (PNG or PDF, by the file's suffix), so it needs no extra dependency and
works the same from the UI, the API and the CLI.
"""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..core.explain import METHODS
from ..core.render import DISCLAIMER
from .predictor import StudyAnalysis
from .reading import NOT_UPPER_EXTREMITY

PAGE = (1240, 1754)  # A4 portrait at 150 dpi
DPI = 150
MARGIN = 60
REPORT_FORMATS = ("pdf", "png")
VERDICT_COLOURS = {"abnormal": (176, 0, 32), "normal": (0, 110, 60), NOT_UPPER_EXTREMITY: (90, 90, 90)}


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def reading_lines(study: dict) -> list[str]:
    """The study's reading in plain words, one fact a line (the report's and the UI's summary)."""
    part, n = study["body_part"], study["n_views"]
    if part is None:
        other = study["body_part_probabilities"]["other"]
        # The heading already says so: the first line gives the figure, the second what to do.
        lines = [
            f"Body part: other (the model gives it {other:.0%}{'; mean of the views' if n > 1 else ''})",
            study["note"],
        ]
    else:
        kept = n - len(study["views_answered_other"])
        mean = f" (mean of {kept} views)" if kept > 1 else ""
        lines = [
            f"Abnormality probability: {study['abnormality_probability']:.1%}{mean}",
            f"Decision threshold: {study['threshold']:.3f} (abnormal at or above)",
            f"Body part: {part} ({study['body_part_status']}; the model gives it "
            f"{study['body_part_probabilities'][part]:.0%})",
            "Validated reading: " + ("yes (measured on held-out MURA data)" if study["validated"] else "NO"),
        ]
        if study["note"]:
            lines.append(study["note"])
    # Views answered other are named, unless all of them were and the heading has said so.
    if study["views_answered_other"] and (part or len(study["views_answered_other"]) < n):
        listed = ", ".join(map(str, study["views_answered_other"]))
        told = "Left out as not upper-extremity radiographs" if part else "Not upper-extremity radiographs"
        lines.append(f"{told}: view {listed}")
    if study["views_disagreeing_on_body_part"]:
        listed = ", ".join(map(str, study["views_disagreeing_on_body_part"]))
        lines.append(f"Views whose own body-part answer differs: {listed}")
    lines.append(f"Model: {study['model']}, weights revision {study['weights_revision']}")
    return lines


def view_caption(index: int, prediction) -> str:
    if prediction.abnormality_probability is None:
        return f"View {index + 1}: {prediction.predicted_body_part}, not read"
    return f"View {index + 1}: {prediction.body_part} {prediction.abnormality_probability:.1%}, {prediction.verdict}"


def fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """``image`` scaled to fit inside ``box`` (w, h), aspect kept."""
    scale = min(box[0] / image.width, box[1] / image.height)
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS)


def render_report(analysis: StudyAnalysis, opacity: float = 0.5, colormap: str = "jet") -> Image.Image:
    """The report page as an RGB image: header, disclaimer, reading, then a row per view
    (the radiograph and each of its maps), then what the maps do and do not mean."""
    page = Image.new("RGB", PAGE, "white")
    draw = ImageDraw.Draw(page)
    width = PAGE[0] - 2 * MARGIN
    y = MARGIN
    draw.text((MARGIN, y), "MURA demo: abnormality reading and explanation maps", fill="black", font=font(34))
    y += 48
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    draw.text((MARGIN, y), f"Generated {stamp}", fill=(90, 90, 90), font=font(18))
    y += 36

    wrapped = textwrap.wrap(DISCLAIMER, 100)
    box_h = 16 + 24 * len(wrapped)
    draw.rectangle((MARGIN, y, MARGIN + width, y + box_h), fill=(255, 236, 200), outline=(200, 120, 0), width=2)
    for i, line in enumerate(wrapped):
        draw.text((MARGIN + 12, y + 8 + 24 * i), line, fill=(110, 50, 0), font=font(20))
    y += box_h + 24

    study = analysis.study
    verdict = study["verdict"]
    draw.text((MARGIN, y), verdict.upper(), fill=VERDICT_COLOURS[verdict], font=font(40))
    y += 56
    for line in reading_lines(study):
        draw.text((MARGIN, y), line, fill="black", font=font(22))
        y += 32
    y += 12

    footer = [
        "Maps show which pixels drove the abnormality score of the body part read (Grad-CAM, Grad-CAM++: feature",
        "regions; saliency: input gradients). They show where the model looked, not where disease is.",
    ]
    footer_top = PAGE[1] - MARGIN - 26 * len(footer)
    methods = list(dict.fromkeys(m for v in analysis.views for m in v.maps))
    columns = 1 + len(methods)
    caption_h, label_h = 30, 26
    # Rows share the space left; a tile is at most 1.4 times as tall as it is wide.
    row_h = min((footer_top - 20 - y) // len(analysis.views), int(1.4 * (width // columns)) + caption_h + label_h)
    tile = (width // columns - 8, row_h - caption_h - label_h - 8)
    for index, view in enumerate(analysis.views):
        draw.text((MARGIN, y), view_caption(index, view.prediction), fill="black", font=font(20))
        overlays = view.overlays(opacity, colormap) if view.maps else {}
        pictures = [("radiograph", view.image.convert("RGB"))] + [
            (METHODS[m].label, Image.fromarray(overlays[m])) for m in methods if m in overlays
        ]
        for col, (label, picture) in enumerate(pictures):
            x = MARGIN + col * (width // columns)
            shown = fit(picture, tile)
            page.paste(shown, (x, y + caption_h))
            draw.text((x, y + caption_h + shown.height + 2), label, fill=(60, 60, 60), font=font(16))
        y += row_h
    for i, line in enumerate(footer):
        draw.text((MARGIN, footer_top + 26 * i), line, fill=(60, 60, 60), font=font(18))
    return page


def report_kind(path: str | Path) -> str:
    """ "pdf" or "png", from the suffix of ``path``; anything else is an error."""
    suffix = Path(path).suffix
    if suffix.lower().lstrip(".") not in REPORT_FORMATS:
        raise ValueError(f"report format must be one of {REPORT_FORMATS}, not '{suffix}'")
    return suffix.lower().lstrip(".")


def save_report(page: Image.Image, path: str | Path) -> Path:
    """Write the page as PNG or PDF, chosen by the suffix of ``path``."""
    path = Path(path)
    if report_kind(path) == "pdf":
        page.save(path, format="PDF", resolution=DPI)
    else:
        page.save(path, format="PNG", dpi=(DPI, DPI))
    return path
