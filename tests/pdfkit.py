"""Read a PDF back (pdfminer.six): its text, and whether every line of it lies on its page."""

from __future__ import annotations

import io


def pdf_pages(data: bytes) -> list[dict]:
    """Per page: its text, and the text lines that lie (even partly) off the page as
    (x0, x1, text)."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTTextLine

    pages = []
    for page in extract_pages(io.BytesIO(data)):
        x0, y0, x1, y1 = page.bbox
        lines: list = []

        def walk(box, lines=lines):
            if isinstance(box, LTTextLine):
                lines.append(box)
            elif hasattr(box, "__iter__"):
                for child in box:
                    walk(child)

        walk(page)
        off = [(round(b.x0), round(b.x1), b.get_text().strip()) for b in lines
               if b.x0 < x0 - 0.5 or b.x1 > x1 + 0.5 or b.y0 < y0 - 0.5 or b.y1 > y1 + 0.5]
        pages.append({"text": "".join(b.get_text() for b in lines), "off_page": off})
    return pages


def check_pdf(data: bytes) -> str:
    """The PDF's whole text, after checking it is a PDF whose every text line is on its page."""
    assert data.startswith(b"%PDF-"), data[:16]
    pages = pdf_pages(data)
    assert pages
    off = {i + 1: p["off_page"][:3] for i, p in enumerate(pages) if p["off_page"]}
    assert off == {}, f"text off the page (page: (x0, x1, text)): {off}"
    return "".join(p["text"] for p in pages)
