"""report.html and compare.html in a real browser: headless Chromium (Debian's `chromium`).

Each report is opened twice. A copy with a small script appended reports, at the load event,
what the browser made of every <img> (decoded? natural size? laid out where, how large,
visible?). The report itself, untouched, is screenshot at the full page height, and every
image's box in the screenshot must show that image's own pixels: so each plot and thumbnail
was decoded, laid out, and painted where a reader would see it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from clikit import cli
from qakit import STRONG, WEAK, brightness_set, publish_binary, write_set

from cellinspect.datasets.decode import decode_image, read_image
from cellinspect.models.report import FLIP_GALLERY_SIZE, GALLERY_SIZE
from cellinspect.models.store import ModelStore

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no `chromium` on PATH: apt-get install chromium (.ci/run installs it)",
)

WIDTH = 1280  # CSS pixels; the reports' body is at most 1200 wide plus margins
PROBE_HEIGHT = 800  # window height for the probe; the layout does not depend on it
MAX_HEIGHT = 16_000  # a taller page would be a broken report (and strain the screenshot)
CHROMIUM_TIMEOUT = 60  # seconds per run; one takes about 1 s
PIXEL_TOLERANCE = 8  # per channel, 0..255: room for colour management, none for a missing image

# The plots each report promises, by alt text; gallery thumbnails come on top, as many as
# the report's own data says (predictions.csv, compare.json).
EVAL_PLOTS = (
    "confusion matrix",
    "ROC and precision-recall curves",
    "reliability diagram",
    "score histograms",
)
COMPARE_PLOTS = ("ROC and PR curves",)

PROBE_ID = "image-probe"
# Runs synchronously in the load event, which waits for every image: Chromium's --dump-dom
# is taken after it, so the result is in the dump (an async handler would race the dump).
PROBE = f"""<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images, (im) => {{
    const box = im.getBoundingClientRect();
    const style = getComputedStyle(im);
    return {{
      alt: im.alt, complete: im.complete,
      natural_width: im.naturalWidth, natural_height: im.naturalHeight,
      x: box.left + scrollX + im.clientLeft, y: box.top + scrollY + im.clientTop,
      width: im.clientWidth, height: im.clientHeight,
      visible: style.display !== "none" && style.visibility === "visible"
        && Number(style.opacity) > 0,
    }};
  }});
  const out = document.createElement("pre");
  out.id = "{PROBE_ID}";
  out.textContent = JSON.stringify({{
    images, page_height: document.documentElement.scrollHeight,
  }});
  document.body.append(out);
}});
</script>
"""


@dataclass(frozen=True)
class ImageTag:
    """An <img> as written in the report."""

    alt: str
    src: str
    in_gallery: bool  # a thumbnail inside a <figure>, not a plot


@dataclass(frozen=True)
class RenderedImage:
    """What the browser made of an <img>: content box in page pixels."""

    alt: str
    complete: bool
    natural_width: int
    natural_height: int
    x: float
    y: float
    width: int
    height: int
    visible: bool


class _ImageTags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[ImageTag] = []
        self._figures = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self._figures += 1
        elif tag == "img":
            a = dict(attrs)
            self.tags.append(ImageTag(a.get("alt") or "", a.get("src") or "", self._figures > 0))

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._figures -= 1


def image_tags(page: str) -> list[ImageTag]:
    parser = _ImageTags()
    parser.feed(page)
    return parser.tags


def chromium(*args: str, profile: Path) -> str:
    """Run headless Chromium with its own profile folder; its stdout."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",  # the sandbox refuses to start as root (CI runs as root)
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
        "--hide-scrollbars",  # the same layout width whatever the window height
        "--force-device-scale-factor=1",  # one screenshot pixel per CSS pixel
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    # Its own process group, so that a hung run takes its renderer and GPU processes with it.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"chromium {' '.join(args)} did not finish in {CHROMIUM_TIMEOUT} s")
    assert proc.returncode == 0, f"chromium {' '.join(args)} exited {proc.returncode}: {err}"
    return out


def probe(report: Path, work: Path) -> tuple[list[RenderedImage], int]:
    """Every <img> of `report` as Chromium lays it out, and the page height."""
    page = report.read_text()
    assert page.count("</body>") == 1, report
    probed = work / f"probed-{report.name}"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = chromium(
        "--dump-dom",
        f"--window-size={WIDTH},{PROBE_HEIGHT}",
        probed.as_uri(),
        profile=work / "chromium-profile",
    )
    found = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the probe did not run at the load event; the DOM ends: {dom[-500:]}"
    result = json.loads(html.unescape(found.group(1)))
    return [RenderedImage(**row) for row in result["images"]], int(result["page_height"])


def screenshot(report: Path, height: int, work: Path) -> tuple[Path, np.ndarray]:
    """The untouched report, shot at the full page height so every image is in view."""
    shot = work / f"{report.stem}.png"
    chromium(
        f"--screenshot={shot}",
        f"--window-size={WIDTH},{height}",
        report.as_uri(),
        profile=work / "chromium-profile",
    )
    assert shot.is_file(), "chromium wrote no screenshot"
    return shot, read_image(shot)


def as_rgb_on_white(image: np.ndarray) -> np.ndarray:
    """A decoded PNG as float RGB, transparency composited over the page's white."""
    assert image.dtype == np.uint8, image.dtype
    pixels = image.astype(np.float64)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:] / 255
        return pixels[:, :, :3] * alpha + 255 * (1 - alpha)
    return pixels


def assert_every_image_shown(report: Path, work: Path) -> list[ImageTag]:
    """Every <img> decoded, laid out at its natural size, visible, and in the screenshot
    with its own pixels; the screenshot is full-page and far from blank. The tags, for the
    caller to check against what the report should hold."""
    tags = image_tags(report.read_text())
    assert tags, f"{report.name} has no images"
    rendered, height = probe(report, work)
    assert [r.alt for r in rendered] == [t.alt for t in tags], "browser and source disagree"
    assert height <= MAX_HEIGHT, f"{report.name} is {height} px tall"

    shot_path, shot = screenshot(report, height, work)
    assert shot.shape[:2] == (height, WIDTH), (shot.shape, shot_path)
    page = as_rgb_on_white(shot)
    gray = page.mean(axis=2)
    assert gray.std() > 20, f"screenshot nearly uniform (std {gray.std():.1f}): {shot_path}"
    inked = (gray < 250).mean()
    assert inked > 0.05, f"screenshot {100 * inked:.1f}% non-white: {shot_path}"

    for tag, seen in zip(tags, rendered, strict=True):
        assert tag.src.startswith("data:image/png;base64,"), f"{tag.alt}: not embedded"
        assert seen.complete and seen.natural_width > 0, f"{tag.alt}: the browser cannot decode it"
        expected = as_rgb_on_white(decode_image(base64.b64decode(tag.src.split(",", 1)[1])))
        h, w = expected.shape[:2]
        assert (seen.natural_width, seen.natural_height) == (w, h), tag.alt
        assert seen.visible and (seen.width, seen.height) == (w, h), (tag.alt, seen)
        x, y = round(seen.x), round(seen.y)
        assert 0 <= x <= WIDTH - w and 0 <= y <= height - h, (tag.alt, seen)
        shown = page[y : y + h, x : x + w]
        matching = (np.abs(shown - expected).max(axis=2) <= PIXEL_TOLERANCE).mean()
        assert matching > 0.99, (
            f"{tag.alt}: only {100 * matching:.1f}% of its pixels on screen at ({x}, {y}) "
            f"match the image: {shot_path}"
        )
        if not tag.in_gallery:  # a plot, not a flat test tile: it must show something
            assert shown.std() > 10, f"plot {tag.alt!r} is blank: {shot_path}"
    return tags


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with held-out set 'held' frozen and tiny v1 (strong) and v2 (weak)."""
    root = tmp_path_factory.mktemp("browser")
    manifest_path, _ = write_set(root / "data", brightness_set())
    result = cli("data", "freeze", str(manifest_path), "--name", "held", home=root)
    assert result.returncode == 0, result.stderr
    store = ModelStore(root / "store")
    for weights in (STRONG, WEAK):
        publish_binary(store, root, weights)
    return root


def test_eval_report_shows_every_plot_and_thumbnail_in_chromium(home: Path, tmp_path: Path) -> None:
    result = cli("models", "eval", "tiny@1", "--data", "held", "--allow-overlap", home=home)
    assert result.returncode == 0, result.stderr
    out = home / "evals" / "tiny@1__held"

    tags = assert_every_image_shown(out / "report.html", tmp_path)

    with (out / "predictions.csv").open(newline="") as f:
        wrong = sum(row["truth"] != row["predicted"] for row in csv.DictReader(f))
    assert wrong > 0  # so the gallery of worst errors is exercised
    assert tuple(t.alt for t in tags if not t.in_gallery) == EVAL_PLOTS
    assert sum(t.in_gallery for t in tags) == min(wrong, GALLERY_SIZE)


def test_compare_report_shows_every_plot_and_thumbnail_in_chromium(
    home: Path, tmp_path: Path
) -> None:
    args = ("models", "compare", "tiny@1", "tiny@2", "--data", "held", "--allow-overlap")
    result = cli(*args, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    out = home / "evals" / "compare" / "tiny@1__vs__tiny@2__held"

    tags = assert_every_image_shown(out / "compare.html", tmp_path)

    pairs = json.loads((out / "compare.json").read_text())["pairs"]
    flips = sum(
        min(p["mcnemar"]["fixed"], FLIP_GALLERY_SIZE)
        + min(p["mcnemar"]["broken"], FLIP_GALLERY_SIZE)
        for p in pairs
    )
    assert flips > 0  # so the flip galleries are exercised
    assert tuple(t.alt for t in tags if not t.in_gallery) == COMPARE_PLOTS
    assert sum(t.in_gallery for t in tags) == flips
