"""Render the specialist referral packet: Jinja2 text template → PDF.

PDF library: **fpdf2** (py-pdf organisation, same maintainers as pypdf; monthly releases,
pure Python, LGPL-3.0). It lays out text with wrapping, headings, links and page breaks in
a few calls and writes standard PDF text objects, so the packet's text can be extracted
(tests do, with pypdf) and faxed. reportlab would also do, but its platypus layer is far
more than a one-column text document needs.

Template format (``templates/packet/referral.txt``): the Jinja2 template renders plain
text; each line is laid out by its first characters: ``# `` title, ``## `` section
heading, ``- `` bullet, ``! `` bold line, ``@ `` the confirmation link, blank line = a
little space, anything else a wrapped paragraph. Values containing line breaks are
indented on continuation lines, so no value can forge markup (a note cannot turn itself
into a link).

Fonts: the PDF core font Helvetica covers Latin-1; characters outside it are transliterated
(NFKD) or replaced with ``?``. Pass ``font_path`` (a Unicode TTF such as DejaVuSans) to
render every character as sent.

Errors: a template that does not render raises :class:`~engine.errors.ChannelError`
(not retryable); the reason names the template, never a value (packets are PHI).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Final

from fpdf import FPDF
from fpdf.enums import XPos, YPos
from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment

from engine.errors import ChannelError
from engine.model import PacketData

DEFAULT_TEMPLATE_DIR: Final = Path(__file__).resolve().parent.parent / "templates" / "packet"
DEFAULT_TEMPLATE: Final = "referral.txt"
_TYPOGRAPHY: Final = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
)


def _flatten(value: Any) -> Any:
    """Jinja ``finalize``: a value's own line breaks become indented continuation lines."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\n    ")
    return value


def latin1(text: str) -> str:
    """Text the PDF core fonts can show: Latin-1 kept, the rest transliterated or ``?``."""
    text = text.translate(_TYPOGRAPHY)
    out = []
    for ch in text:
        if ord(ch) < 256:
            out.append(ch)
            continue
        folded = unicodedata.normalize("NFKD", ch).encode("latin-1", "ignore").decode("latin-1")
        out.append(folded or "?")
    return "".join(out)


class _Pdf(FPDF):
    footer_text = ""

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(self.font_family, size=8)
        self.cell(0, 6, f"{self.footer_text}    page {self.page_no()}/{{nb}}", align="C")


class PacketRenderer:
    """Renders :class:`~engine.model.PacketData` to text and to PDF bytes.

    Thread-safe and reusable: the template is loaded once; each render builds a new PDF.
    """

    def __init__(
        self,
        template_dir: Path = DEFAULT_TEMPLATE_DIR,
        *,
        template: str = DEFAULT_TEMPLATE,
        font_path: Path | None = None,
    ):
        env = SandboxedEnvironment(
            loader=FileSystemLoader(str(template_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            finalize=_flatten,
        )
        self._name = template
        try:
            self._template = env.get_template(template)
        except TemplateError as exc:
            raise ChannelError(
                f"packet: template {template} does not load", retryable=False
            ) from exc
        self._font_path = font_path

    def render_text(self, data: PacketData) -> str:
        """The packet as marked-up text (what the PDF lays out)."""
        try:
            return self._template.render(d=data)
        except TemplateError as exc:
            raise ChannelError(
                f"packet: template {self._name} failed to render", retryable=False
            ) from exc

    def render_pdf(self, data: PacketData) -> bytes:
        """The packet as a PDF document."""
        text = self.render_text(data)
        pdf = _Pdf(format="Letter")
        pdf.set_title("Referral packet")
        pdf.set_creator("refloop")
        pdf.set_auto_page_break(auto=True, margin=18)
        if self._font_path is not None:
            pdf.add_font("packet", "", str(self._font_path))
            pdf.add_font("packet", "B", str(self._font_path))
            family, clean = "packet", (lambda s: s)
        else:
            family, clean = "Helvetica", latin1
        pdf.footer_text = clean(f"Referral {data.referral_id}") if data.referral_id else ""
        pdf.set_font(family, size=10)
        pdf.add_page()
        for line in text.splitlines():
            self._line(pdf, family, clean(line.rstrip()))
        return bytes(pdf.output())

    @staticmethod
    def _line(pdf: FPDF, family: str, line: str) -> None:
        kw: dict[str, Any] = {"new_x": XPos.LMARGIN, "new_y": YPos.NEXT}
        if not line.strip():
            pdf.ln(2)
        elif line.startswith("# "):
            pdf.set_font(family, "B", 16)
            _cell(pdf, 8, line[2:], align="L", **kw)
            pdf.ln(1)
        elif line.startswith("## "):
            pdf.ln(2)
            pdf.set_font(family, "B", 12)
            _cell(pdf, 7, line[3:], align="L", **kw)
        elif line.startswith("! "):
            pdf.set_font(family, "B", 10)
            _cell(pdf, 5, line[2:], align="L", **kw)
        elif line.startswith("@ "):
            url = line[2:].strip()
            pdf.set_font(family, "", 10)
            pdf.set_text_color(0, 0, 160)
            _cell(pdf, 5, url, align="L", link=url, **kw)
            pdf.set_text_color(0, 0, 0)
        elif line.startswith("- "):
            pdf.set_font(family, "", 10)
            pdf.set_x(pdf.l_margin + 4)
            _cell(pdf, 5, "- " + line[2:], align="L", **kw)
        else:
            pdf.set_font(family, "", 10)
            _cell(pdf, 5, line, align="L", **kw)


def _cell(pdf: FPDF, h: float, text: str, **kw: Any) -> None:
    """``multi_cell`` for text that may wrap; a plain ``cell`` when it fits the line, as
    most of a packet's lines do: the same output, without fpdf's line breaking, which
    measured the text character by character and took over a third of the simulator's
    time (docs/performance.md, "Simulator")."""
    room = pdf.w - pdf.r_margin - pdf.get_x() - 2 * pdf.c_margin
    if "\n" not in text and pdf.get_string_width(text) <= room:
        pdf.cell(0, h, text, **kw)
    else:
        pdf.multi_cell(0, h, text, **kw)


def render_packet(data: PacketData, renderer: PacketRenderer | None = None) -> bytes:
    """Convenience: the PDF for ``data`` with the default template."""
    return (renderer or PacketRenderer()).render_pdf(data)
