"""QR codes in images and PDFs, and the web addresses they lead to ("quishing": the link a
filter cannot read in the text, scanned by a phone outside the practice's protection), and the
links of PDFs.

CPU work for the worker process that reads attachments. Libraries: Pillow (image decoding,
header read first so an image's size is known before its pixels are), zxing-cpp (ZXing's C++
port: QR codes in a grey-scale image), pypdf (images and link annotations inside PDFs).

Bounded per message (`Reader`): images of more than MAX_PIXELS are not decoded, sides longer
than DECODE_SIDE are scaled down to it first, images smaller than a QR code (tracking pixels)
are not counted, at most MAX_IMAGES images are read and all of it within BUDGET_S seconds; in
PDFs, the first MAX_PDF_PAGES pages' images (none past MAX_PDF_PIXELS, in forms too) and the
first MAX_PDF_LINK_PAGES pages' links. What was not read is said (`unread`), never silent:
the attachments check makes it a sign. QR codes drawn as vector paths are not read.
"""

from __future__ import annotations

import io
import math
import re
import time
import warnings
from typing import Any

import zxingcpp
from PIL import Image
from pypdf import PdfReader

MAX_PIXELS = 16_000_000
MAX_IMAGES = 20
MAX_PDF_PAGES = 3
MAX_PDF_IMAGES = 10
MAX_PDF_LINK_PAGES = 20
MAX_PDF_PAGE_COUNT = 5_000  # a PDF announcing more pages is not opened for images
MAX_CODES = 5  # QR codes kept per image
MIN_SIDE = 21  # a QR code's smallest size, in modules
DECODE_SIDE = 2000  # pixels a side images are read at
BUDGET_S = 3.0  # decoding time per message
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp",
                         "image/x-ms-bmp", "image/tiff"})
_URL = re.compile(r"^\s*(?:https?://|www\.)\S+", re.IGNORECASE)

_QR = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
# Pillow's own bomb guard refuses an image announcing more than twice this; below it, this
# reader's bound (MAX_PIXELS) decides, and says so.
Image.MAX_IMAGE_PIXELS = 2 * MAX_PIXELS


class Reader:
    """One message's QR reading, within its budget of images and time."""

    def __init__(self, *, budget_s: float = BUDGET_S, max_images: int = MAX_IMAGES) -> None:
        self._deadline = time.monotonic() + budget_s
        self._left = max_images
        self.unread: list[str] = []  # "name: why", for what could not be read

    def _may_read(self, name: str) -> bool:
        if self._left <= 0:
            self.unread.append(f"{name}: more than {MAX_IMAGES} images")
            return False
        if time.monotonic() > self._deadline:
            self.unread.append(f"{name}: reading time spent ({BUDGET_S:g} s)")
            return False
        return True

    def image(self, name: str, data: bytes) -> list[str]:
        """The web addresses of the QR codes in an image file ([] for anything unreadable)."""
        try:
            with warnings.catch_warnings():
                # Pillow warns of images past its bound; this reader's own bound says it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            self.unread.append(f"{name}: an image announcing over {4 * MAX_PIXELS:,} pixels")
            return []
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - not an image Pillow can open
            return []
        try:
            with opened as img:
                width, height = img.size
                if min(width, height) < MIN_SIDE:
                    return []  # a tracking pixel or an icon: not counted
                if width * height > MAX_PIXELS:
                    self.unread.append(f"{name}: {width}x{height} pixels")
                    return []
                if not self._may_read(name):
                    return []
                self._left -= 1
                factor = math.ceil(max(width, height) / DECODE_SIDE)
                if factor > 1 and img.format == "JPEG":
                    img.draft("L", (width // factor, height // factor))  # scaled while decoded
                return _links_in(img)
        except MemoryError:
            raise  # the worker's memory limit: the job fails and the process is replaced
        except Exception:  # noqa: BLE001 - hostile images raise whatever the decoder raises
            return []

    def pdf(self, name: str, data: bytes) -> tuple[list[str], list[str]]:
        """(web addresses of the QR codes in the images of a PDF's first pages, web
        addresses of its first pages' link annotations)."""
        codes: list[str] = []
        links: list[str] = []
        try:
            reader = PdfReader(io.BytesIO(data))
            root: Any = reader.trailer["/Root"]
            count = int(root["/Pages"].get("/Count", 0))
            if count > MAX_PDF_PAGE_COUNT:
                self.unread.append(f"{name}: {count} pages")
                return codes, links
            pages = min(count, MAX_PDF_LINK_PAGES)
            images = 0
            for number in range(pages):
                page = reader.get_page(number)
                links += _annotation_links(page)
                if number >= MAX_PDF_PAGES or images >= MAX_PDF_IMAGES:
                    continue
                if not _images_fit(page.get("/Resources"), depth=0):
                    self.unread.append(f"{name}: page {number + 1}: an image over "
                                       f"{MAX_PIXELS // 1_000_000} Mpx")
                    continue
                for image in page.images:
                    if images >= MAX_PDF_IMAGES or not self._may_read(name):
                        break
                    pil = image.image
                    if pil is None or min(pil.size) < MIN_SIDE:
                        continue
                    images += 1
                    self._left -= 1
                    codes += _links_in(pil)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - hostile PDFs raise whatever pypdf raises
            pass
        return codes, links


def _annotation_links(page: Any) -> list[str]:
    """The URIs of a page's link annotations, as pypdf decodes them (hex strings, escapes)."""
    found: list[str] = []
    annots = page.get("/Annots")
    for ref in (annots.get_object() if annots is not None else [])[:200]:
        action = ref.get_object().get("/A")
        uri = action.get_object().get("/URI") if action is not None else None
        if uri is not None:
            text = str(uri).strip()
            if _URL.match(text):
                found.append(text[:2048])
    return found


def _images_fit(resources: Any, *, depth: int) -> bool:
    """Every image within MAX_PIXELS, in the page's resources and its forms' (read from their
    dictionaries, before anything is decoded)."""
    if resources is None or depth > 3:
        return True
    xobjects = resources.get_object().get("/XObject")
    if xobjects is None:
        return True
    for ref in list(xobjects.get_object().values())[:100]:
        obj = ref.get_object()
        kind = obj.get("/Subtype")
        if kind == "/Image" and \
                int(obj.get("/Width", 0)) * int(obj.get("/Height", 0)) > MAX_PIXELS:
            return False
        if kind == "/Form" and not _images_fit(obj.get("/Resources"), depth=depth + 1):
            return False
    return True


def _links_in(img: Image.Image) -> list[str]:
    gray = img.convert("L")
    if max(gray.size) > DECODE_SIDE:
        gray.thumbnail((DECODE_SIDE, DECODE_SIDE))
    codes = zxingcpp.read_barcodes(gray, formats=_QR)
    return [c.text.strip()[:2048] for c in codes[:MAX_CODES] if _URL.match(c.text)]
