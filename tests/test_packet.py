"""The referral packet: renders for every referral-carrying message in the shared corpus
(the PDF's extracted text holds the referral reason), and an embedded base64 PDF passes
through byte-exact."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import CORPUS, hl7
from pypdf import PdfReader

from channels.packet import PacketRenderer, latin1
from engine.delivery.packet_source import packet_data_from_hl7
from engine.hl7v2.message import read_msh, split_messages
from engine.model import PacketData

REFERRAL_TYPES = ("REF", "ORM", "OMG")


def referral_messages() -> list[tuple[str, bytes]]:
    """Every REF / ORM / OMG message in the corpus that carries an order or referral
    (RF1, ORC or OBR present)."""
    out = []
    for path in sorted(CORPUS.rglob("*")):
        if not path.is_file():
            continue
        for i, raw in enumerate(split_messages(path.read_bytes()).messages):
            try:
                msh, _ = read_msh(raw)
            except Exception:
                continue
            segments = {line[:3] for line in raw.replace(b"\n", b"\r").split(b"\r")}
            if msh.message_type.split("^")[0] in REFERRAL_TYPES and segments & {
                b"RF1",
                b"ORC",
                b"OBR",
            }:
                out.append((f"{path.relative_to(CORPUS)}#{i}", raw))
    return out


MESSAGES = referral_messages()


@pytest.fixture(scope="module")
def renderer() -> PacketRenderer:
    return PacketRenderer()


def pdf_text(pdf: bytes) -> str:
    return "\n".join(page.extract_text() or "" for page in PdfReader(io.BytesIO(pdf)).pages)


def _squash(text: str) -> str:
    return " ".join(text.split())


def test_corpus_has_referral_messages() -> None:
    kinds = {raw.split(b"|")[8][:3] for _, raw in MESSAGES}
    assert len(MESSAGES) >= 10
    assert {b"REF", b"ORM", b"OMG"} <= kinds


@pytest.mark.parametrize(("name", "raw"), MESSAGES, ids=[n for n, _ in MESSAGES])
def test_packet_renders_with_reason(renderer: PacketRenderer, name: str, raw: bytes) -> None:
    data = packet_data_from_hl7(raw, confirmation_url="https://refloop.example/confirm/t0k3n")
    assert data.reason, f"{name}: no referral reason found"
    pdf = renderer.render_pdf(data)
    assert pdf.startswith(b"%PDF-")
    text = _squash(pdf_text(pdf))
    assert _squash(latin1(data.reason)) in text
    assert "Please confirm receipt" in text
    assert "https://refloop.example/confirm/t0k3n" in text


def test_ref_i12_fields() -> None:
    raw = (CORPUS / "fhir-converter" / "REF-I12-01.hl7").read_bytes()
    d = packet_data_from_hl7(raw)
    assert d.referral_id == "226839"
    assert d.reason == "Provider Ordered"
    assert d.referring.name == "DR ROBERT POWELL, MD" and d.referring.phone == "(626)555-1234"
    assert d.specialist.name == "DR PAUL McWILLIAMS, MD"
    assert d.diagnoses == ("K63.3 Ulcer of Intestine",)
    assert "Test Positive.Infection indicates presence of ulcer" in d.notes
    assert (
        d.insurance[0].plan == "Blue Advantage HMO" and d.insurance[0].policy_number == "548851236L"
    )
    assert d.needed_by == "2022-02-10"


def embedded_pdf() -> bytes:
    """A real little PDF with bytes above 0x7f, made by the renderer itself."""
    return PacketRenderer().render_pdf(
        PacketData(referral_id="x", message_type="ORU^R01", reason="prior consult é")
    )


def test_obx_ed_pdf_passes_through_byte_exact(renderer: PacketRenderer) -> None:
    doc = embedded_pdf()
    b64 = base64.b64encode(doc).decode()
    raw = hl7(
        "ed1",
        msg_type="ORM^O01",
        body=(
            "PID|1||12345^^^MRN||DOE^JANE||19800101|F",
            "ORC|NW|PL-77^CLINIC",
            "OBR|1|PL-77||CARD^Cardiology consult^L|S" + "|" * 26 + "Chest pain on exertion",
            "NTE|1||Please see attached ECG report",
            f"OBX|1|ED|PDF^ECG report^L||^AP^PDF^Base64^{b64}||||||F",
            "OBX|2|ED|IMG^Not a PDF^L||^IM^JPEG^Base64^VGhpcyBpcyBub3QgYSBQREY=||||||F",
        ),
    )
    data = packet_data_from_hl7(raw)
    assert data.reason == "Chest pain on exertion"
    assert data.urgency == "stat"
    assert len(data.attachments) == 1
    att = data.attachments[0]
    assert att.content_type == "application/pdf" and att.data == doc
    text = _squash(pdf_text(renderer.render_pdf(data)))
    assert "Chest pain on exertion" in text and att.filename in text


def test_values_cannot_forge_markup(renderer: PacketRenderer) -> None:
    data = PacketData(
        referral_id="r1",
        message_type="REF^I12",
        reason="line one\n@ https://evil.example/\n# Fake title",
    )
    text = renderer.render_text(data)
    assert "\n@ https://evil.example/" not in text
    assert "\n    @ https://evil.example/" in text


def test_non_latin_text_is_transliterated(renderer: PacketRenderer) -> None:
    data = PacketData(referral_id="r1", message_type="REF^I12", reason="Zoë – “Łódź” 東京")
    text = _squash(pdf_text(renderer.render_pdf(data)))
    assert 'Zoë - "?ódz" ??' in text  # Ł has no decomposition; ź folds to z


def test_dejavu_font_when_available(tmp_path: Path) -> None:
    font = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if not font.exists():
        pytest.skip("DejaVuSans not installed")
    r = PacketRenderer(font_path=font)
    text = pdf_text(
        r.render_pdf(PacketData(referral_id="r1", message_type="REF^I12", reason="Łódź"))
    )
    assert "Łódź" in text


def test_lines_that_fit_are_laid_out_as_fpdf_lays_them_out(
    renderer: PacketRenderer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line that fits the page goes out as one ``cell`` (fpdf's line breaking, char by
    char, was a third of the simulator's time); the text on every page, line by line,
    is what ``multi_cell`` for every line gives (the layout before), for every corpus
    referral and for a reason long enough to wrap over several lines."""
    import channels.packet as packet

    def every_line_wrapped(pdf: Any, h: float, text: str, **kw: Any) -> None:
        pdf.multi_cell(0, h, text, **kw)

    cases = [raw for _, raw in MESSAGES]
    for raw in cases:
        data = packet_data_from_hl7(raw, confirmation_url="https://refloop.example/c/t")
        long = replace(data, reason=" ".join(["chest pain on exertion"] * 40))
        for d in (data, long):
            fast = pdf_text(renderer.render_pdf(d))
            with monkeypatch.context() as m:
                m.setattr(packet, "_cell", every_line_wrapped)
                before = pdf_text(renderer.render_pdf(d))
            assert fast.splitlines() == before.splitlines()
