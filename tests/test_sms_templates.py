"""SMS templates carry no PHI: the allow-list is enforced statically (what
``refloop routes check`` runs) and again when rendering."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2 import StrictUndefined, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from channels.sms.templates import (
    ALLOWED_VARIABLES,
    SmsContext,
    SmsTemplateError,
    SmsTemplates,
    check_sms_template,
)
from channels.sms.twilio import is_gsm7
from engine.errors import ChannelError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "sms"
SHIPPED = SmsTemplates(TEMPLATES).names()
# Long but realistic practice values: the shipped texts must still fit 160 characters.
PRACTICE = SmsContext(
    practice_name="Riverside Family Medicine Group",
    practice_phone="+1 (555) 010-0123",
    booking_link="https://book.example.org/r/abc123",
    greeting="Hello",
    specialty_category="heart care",
)
SAFE = "{{ practice_name }}: call {{ practice_phone }}. Reply STOP to opt out."


def test_the_shipped_set_is_complete() -> None:
    assert {"first_nudge", "second_nudge", "help", "stop_confirm"} <= set(SHIPPED)


@pytest.mark.parametrize("allow_specialty", [False, True], ids=["default", "specialty-allowed"])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_template_passes_and_fits(name: str, allow_specialty: bool) -> None:
    templates = SmsTemplates(TEMPLATES, allow_specialty=allow_specialty)
    assert check_sms_template(templates.source(name), allow_specialty) == []
    body = templates.render(name, PRACTICE)
    assert is_gsm7(body) and len(body) <= 160
    assert PRACTICE.practice_name in body  # the FCC exemption: name the provider
    if name == "stop_confirm":
        assert "START" in body and "STOP" not in body
    else:
        assert "Reply STOP to opt out" in body


def test_shipped_set_checks_clean_with_real_values() -> None:
    assert SmsTemplates(TEMPLATES).check(PRACTICE) == []


def test_help_answers_with_the_practice_phone() -> None:
    assert PRACTICE.practice_phone in SmsTemplates(TEMPLATES).render("help", PRACTICE)


# Templates that reach for PHI, or for data through a back door.
FORBIDDEN: list[tuple[str, str]] = [
    ("patient-name", "{{ patient_name }}, " + SAFE),
    ("dob", "Born {{ dob }}. " + SAFE),
    ("mrn", "MRN {{ mrn }}. " + SAFE),
    ("diagnosis", "About your {{ diagnosis }}. " + SAFE),
    ("specialist-name", "See Dr {{ specialist_name }}. " + SAFE),
    ("specialty-by-default", "Your {{ specialty_category }} referral. " + SAFE),
    ("first-name", "Hi {{ first_name }}! " + SAFE),
    ("referral-attribute", "{{ referral.patient.name }} " + SAFE),
    ("attribute-on-allowed", "{{ practice_name.__class__ }} " + SAFE),
    ("method-call", "{{ practice_name.upper() }} " + SAFE),
    ("item-access", "{{ practice_name[0] }} " + SAFE),
    ("attr-filter", "{{ practice_name|attr('x') }} " + SAFE),
    ("default-filter-leak", "{{ greeting|default(patient_name) }} " + SAFE),
    ("self", "{{ self }} " + SAFE),
    ("include", "{% include 'patient.txt' %} " + SAFE),
    ("import", "{% import 'x' as x %} " + SAFE),
    ("macro", "{% macro m() %}x{% endmacro %}" + SAFE),
    ("set-from-phi", "{% set n = patient_name %}{{ n }} " + SAFE),
    ("if-on-phi", "{% if diagnosis %}x{% endif %}" + SAFE),
    ("loop-over-phi", "{% for x in medications %}{{ x }}{% endfor %}" + SAFE),
    ("global-function", "{{ range(3) }} " + SAFE),
    ("syntax-error", "{{ practice_name " + SAFE),
]


@pytest.mark.parametrize("source", [s for _, s in FORBIDDEN], ids=[i for i, _ in FORBIDDEN])
def test_forbidden_template_fails_the_static_check(source: str) -> None:
    problems = check_sms_template(source, allow_specialty=False)
    assert problems
    assert all("Riverside" not in p for p in problems)


@pytest.mark.parametrize("source", [s for _, s in FORBIDDEN], ids=[i for i, _ in FORBIDDEN])
def test_forbidden_template_raises_when_rendered(source: str) -> None:
    with pytest.raises(SmsTemplateError) as info:
        SmsTemplates(TEMPLATES).render_source(source, PRACTICE)
    assert isinstance(info.value, ChannelError) and info.value.retryable is False
    assert PRACTICE.practice_name not in str(info.value)


@pytest.mark.parametrize(
    "name", ["patient_name", "dob", "mrn", "diagnosis", "specialist_name", "specialty_category"]
)
def test_phi_variable_is_named_in_the_problem(name: str) -> None:
    problems = check_sms_template("{{ " + name + " }} " + SAFE)
    assert any(f"'{name}'" in p for p in problems), problems


def test_render_context_holds_only_the_allow_list() -> None:
    """Even without the static check, the render context has nothing else to find."""
    templates = SmsTemplates(TEMPLATES)
    assert set(templates.context(PRACTICE)) == ALLOWED_VARIABLES
    assert "specialty_category" in SmsTemplates(TEMPLATES, allow_specialty=True).context(PRACTICE)
    env = SandboxedEnvironment(undefined=StrictUndefined)
    for name in ("patient_name", "dob", "mrn", "diagnosis", "specialist_name"):
        with pytest.raises(UndefinedError):
            env.from_string("{{ " + name + " }}").render(templates.context(PRACTICE))


def test_specialty_is_allowed_only_where_the_practice_allows_it() -> None:
    source = "{{ practice_name }}: your {{ specialty_category }} referral. Reply STOP to opt out."
    assert check_sms_template(source, allow_specialty=True) == []
    body = SmsTemplates(TEMPLATES, allow_specialty=True).render_source(source, PRACTICE)
    assert "heart care" in body
    with pytest.raises(SmsTemplateError, match="sms_may_name_specialty"):
        SmsTemplates(TEMPLATES).render_source(source, PRACTICE)
    # other PHI stays forbidden even then
    assert check_sms_template("{{ diagnosis }} " + SAFE, allow_specialty=True)


def test_default_context_never_exposes_the_specialty_value() -> None:
    ctx = SmsContext("Riverside", "555-0100", specialty_category="oncology")
    for name in SHIPPED:
        assert "oncology" not in SmsTemplates(TEMPLATES).render(name, ctx)


BODY_RULES: list[tuple[str, str, int, str]] = [
    ("over-160", "{{ practice_name }} " + "x" * 150 + " Reply STOP", 160, "over the limit"),
    ("no-opt-out", "{{ practice_name }}: call {{ practice_phone }}.", 160, "opt-out"),
    ("not-gsm7", "{{ practice_name }} ✓ Reply STOP to opt out", 160, "GSM-7"),
    ("empty", "{{ greeting|trim }}", 160, "empty"),
]


@pytest.mark.parametrize(
    ("source", "max_chars", "message"),
    [r[1:] for r in BODY_RULES],
    ids=[r[0] for r in BODY_RULES],
)
def test_rendered_body_rules(source: str, max_chars: int, message: str) -> None:
    ctx = SmsContext("Riverside", "555-0100", greeting="")
    with pytest.raises(SmsTemplateError, match=message):
        SmsTemplates(TEMPLATES, max_chars=max_chars).render_source(source, ctx)


def test_longer_bodies_when_configured() -> None:
    source = "{{ practice_name }} " + "x" * 150 + " Reply STOP to opt out"
    ctx = SmsContext("Riverside", "555-0100")
    assert len(SmsTemplates(TEMPLATES, max_chars=306).render_source(source, ctx)) > 160


def test_check_names_the_file_of_a_bad_template(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text(SAFE, encoding="utf-8")
    (tmp_path / "bad.txt").write_text("{{ mrn }} " + SAFE, encoding="utf-8")
    (tmp_path / "long.txt").write_text("{{ practice_name }}" + "x" * 200 + " STOP")
    problems = SmsTemplates(tmp_path).check(PRACTICE)
    assert len(problems) == 2
    assert "bad.txt" in problems[0] and "'mrn'" in problems[0]
    assert "long.txt" in problems[1] and "over the limit" in problems[1]


def test_unknown_or_path_like_template_names_are_refused() -> None:
    templates = SmsTemplates(TEMPLATES)
    with pytest.raises(SmsTemplateError, match="not found"):
        templates.render("nope", PRACTICE)
    with pytest.raises(SmsTemplateError, match="plain name"):
        templates.render("../secrets", PRACTICE)
