"""Broken routes.yaml variants: each error names the exact file:line and key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine import config
from engine.cli.main import main
from engine.errors import ConfigError
from engine.routing.compile import compile_config

HEAD = """\
version: 1
sources:
  ehr: {type: mllp, port: 0}
channels:
  cardio-fax:
    type: fax
    api_key: ${env:FAX_KEY:-unset}
    templates:
      packet: "Referral for {{ practice.name }}"
tables:
  spec: {CARD: Cardiology}
routes:
"""  # routes start on line 13

# (id, routes text starting at line 13, expected "line key.path: message" fragment)
CASES = [
    (
        "unknown-route-key",
        """\
        - name: a
          when: {type: ORM^O01}
          thne: [{drop: x}]
        """,
        "r.yaml:15 routes[0].thne: unknown key",
    ),
    (
        "missing-then",
        """\
        - name: a
          when: {type: ORM^O01}
        """,
        "r.yaml:13 routes[0].then: is required",
    ),
    (
        "bad-route-name",
        """\
        - name: New Referrals
          then: [{drop: x}]
        """,
        "r.yaml:13 routes[0].name: route names are lower-case",
    ),
    (
        "duplicate-route-name",
        """\
        - name: a
          then: [{drop: x}]
        - name: a
          then: [{drop: y}]
        """,
        "r.yaml:15 routes[1].name: duplicate route name 'a' (first at r.yaml:13)",
    ),
    (
        "unknown-source",
        """\
        - name: a
          from: [ehr, lab]
          then: [{drop: x}]
        """,
        "r.yaml:14 routes[0].from[1]: unknown source 'lab' (sources: ehr)",
    ),
    (
        "bad-type-pattern",
        """\
        - name: a
          when:
            type: [ORM^O01, "orm o01"]
          then: [{drop: x}]
        """,
        "r.yaml:15 routes[0].when.type[1]: bad message type pattern 'orm o01'",
    ),
    (
        "bad-terse-path-in-when",
        """\
        - name: a
          when:
            type: ORM^O01
            ORC.x: NW
          then: [{drop: x}]
        """,
        "r.yaml:16 routes[0].when.ORC.x: bad terse path 'ORC.x'",
    ),
    (
        "unknown-when-key",
        """\
        - name: a
          when:
            tpye: ORM^O01
          then: [{drop: x}]
        """,
        "r.yaml:15 routes[0].when.tpye: unknown key (expected type, any, or a terse path",
    ),
    (
        "unknown-predicate",
        """\
        - name: a
          when:
            ORC.1: {equal: NW}
          then: [{drop: x}]
        """,
        "r.yaml:15 routes[0].when.ORC.1.equal: unknown predicate",
    ),
    (
        "bad-regex",
        """\
        - name: a
          when:
            OBR.4.1:
              matches: "^(REF"
          then: [{drop: x}]
        """,
        "r.yaml:16 routes[0].when.OBR.4.1.matches: bad regular expression",
    ),
    (
        "yaml-boolean-code",
        """\
        - name: a
          when:
            PV1.2: NO
          then: [{drop: x}]
        """,
        "r.yaml:15 routes[0].when.PV1.2: must be a code",
    ),
    (
        "bad-terse-path-in-extract",
        """\
        - name: a
          extract:
            placer_number: orc.2.1
          then: [{track: referral-created}]
        """,
        "r.yaml:15 routes[0].extract.placer_number: bad terse path 'orc.2.1'",
    ),
    (
        "jinja-syntax-error",
        """\
        - name: a
          extract:
            placer_number: ORC.2.1
            needed_by: "{{ field('TQ1.8.1') | }}"
          then: [{track: referral-created}]
        """,
        "r.yaml:16 routes[0].extract.needed_by: template syntax error",
    ),
    (
        "jinja-undefined-name",
        """\
        - name: a
          extract:
            placer_number: ORC.2.1
            reason: "{{ placer_numbr ~ '!' }}"
          then: [{track: referral-created}]
        """,
        "r.yaml:16 routes[0].extract.reason: undefined name 'placer_numbr'",
    ),
    (
        "jinja-name-defined-later",
        """\
        - name: a
          extract:
            reason: "{{ placer_number }}"
            placer_number: ORC.2.1
          then: [{track: referral-created}]
        """,
        "r.yaml:15 routes[0].extract.reason: undefined name 'placer_number'",
    ),
    (
        "jinja-unknown-filter",
        """\
        - name: a
          extract:
            placer_number: ORC.2.1
            needed_by: "{{ field('TQ1.8.1') | hl7date }}"
          then: [{track: referral-created}]
        """,
        "r.yaml:16 routes[0].extract.needed_by: unknown filter 'hl7date'",
    ),
    (
        "jinja-bad-path-in-field",
        """\
        - name: a
          extract:
            placer_number: "{{ field('ORC-2') }}"
          then: [{track: referral-created}]
        """,
        "r.yaml:15 routes[0].extract.placer_number: bad terse path 'ORC-2'",
    ),
    (
        "unknown-table",
        """\
        - name: a
          extract:
            placer_number: ORC.2.1
            specialty_category: "{{ field('OBR.4.1') | lookup('specialty') }}"
          then: [{track: referral-created}]
        """,
        "r.yaml:16 routes[0].extract.specialty_category: unknown table 'specialty'",
    ),
    (
        "extract-not-an-event-field",
        """\
        - name: a
          extract:
            placer_number: ORC.2.1
            apointment_id: SCH.2.1
          then: [{track: appointment-booked}]
        """,
        "r.yaml:16 routes[0].extract.apointment_id: 'apointment_id' is not a field of "
        "appointment-booked",
    ),
    (
        "unknown-event-kind",
        """\
        - name: a
          then:
            - track: referral-accepted
        """,
        "r.yaml:15 routes[0].then[0].track: unknown event kind 'referral-accepted'",
    ),
    (
        "unknown-action",
        """\
        - name: a
          then:
            - email: someone
        """,
        "r.yaml:15 routes[0].then[0].email: unknown action",
    ),
    (
        "unknown-channel",
        """\
        - name: a
          then:
            - send: {channel: faxx, template: packet, to: PRD(RT).5.1}
        """,
        "r.yaml:15 routes[0].then[0].send.channel: unknown channel 'faxx' (channels: cardio-fax)",
    ),
    (
        "unknown-template",
        """\
        - name: a
          then:
            - send:
                channel: cardio-fax
                template: packett
                to: PRD(RT).5.1
        """,
        "r.yaml:17 routes[0].then[0].send.template: unknown template 'packett' of channel "
        "'cardio-fax' (packet)",
    ),
    (
        "forward-to-non-mllp",
        """\
        - name: a
          then:
            - forward: cardio-fax
        """,
        "r.yaml:15 routes[0].then[0].forward: forward needs an mllp channel",
    ),
    (
        "drop-with-track",
        """\
        - name: a
          extract: {placer_number: ORC.2.1}
          then:
            - track: referral-created
            - drop: why
        """,
        "r.yaml:15 routes[0].then: drop cannot be combined with other actions",
    ),
    (
        "continue-not-bool",
        """\
        - name: a
          then: [{drop: x}]
          continue: maybe
        """,
        "r.yaml:15 routes[0].continue: must be true or false",
    ),
]


def _text(routes: str) -> str:
    return HEAD + textwrap.indent(textwrap.dedent(routes), "  ")


@pytest.mark.parametrize(("case", "routes", "expected"), CASES, ids=[c[0] for c in CASES])
def test_route_error_names_line_and_path(case: str, routes: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_config(config.loads(_text(routes), file="r.yaml"))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_the_base_file_is_valid() -> None:
    table = compile_config(
        config.loads(_text("- name: a\n  then: [{drop: fine}]\n"), file="r.yaml")
    )
    assert [r.name for r in table.routes] == ["a"]


SECTION_CASES = [
    (
        "table-value-bool",
        "tables:\n  yn:\n    Y: yes\n",
        "r.yaml:6 tables.yn.Y: table values must be text",
    ),
    (
        "channel-unknown-type",
        "channels:\n  pager:\n    type: pager\n",
        "r.yaml:6 channels.pager.type: must be one of mllp, direct",
    ),
    (
        "channel-literal-secret",
        "channels:\n  sms:\n    type: sms\n    auth_token: abc123\n",
        "r.yaml:7 channels.sms.auth_token: secrets never live in routes.yaml",
    ),
    (
        "sms-template-reaches-for-phi",
        "channels:\n  sms:\n    type: sms\n    auth_token: ${env:T:-x}\n    templates:\n"
        "      remind: 'Hi {{ patient_name }}, call {{ practice_phone }}. Reply STOP'\n",
        "r.yaml:9 channels.sms.templates.remind: 'patient_name' is not in the SMS allow-list "
        "(booking_link, greeting, practice_name, practice_phone) (no PHI over SMS)",
    ),
    (
        "sms-template-attribute-access",
        "channels:\n  sms:\n    type: sms\n    auth_token: ${env:T:-x}\n    templates:\n"
        "      remind: 'Call {{ practice.phone }}. Reply STOP'\n",
        "r.yaml:9 channels.sms.templates.remind: line 1: attribute access: not allowed",
    ),
    (
        "sms-template-specialty-not-allowed",
        "channels:\n  sms:\n    type: sms\n    auth_token: ${env:T:-x}\n    templates:\n"
        "      remind: 'Your {{ specialty_category }} referral. Reply STOP'\n",
        "r.yaml:9 channels.sms.templates.remind: 'specialty_category' is not allowed in SMS "
        "unless practice.sms_may_name_specialty is true",
    ),
    (
        "practice-old-specialty-key",
        "practice:\n  name: Clinic\n  share_specialty_category: true\n",
        "r.yaml:6 practice.share_specialty_category: unknown key",
    ),
    (
        "channel-bad-max-attempts",
        "channels:\n  hook:\n    type: webhook\n    url: https://x.example.org/h\n"
        "    secret: ${env:S:-x}\n    max_attempts: 0\n",
        "r.yaml:9 channels.hook.max_attempts:",
    ),
    (
        "practice-bad-time-zone",
        "practice:\n  name: Clinic\n  time_zone: Mars/Olympus\n",
        "r.yaml:6 practice.time_zone: unknown time zone 'Mars/Olympus'",
    ),
    (
        "practice-unknown-key",
        "practice:\n  name: Clinic\n  phonee: '555'\n",
        "r.yaml:6 practice.phonee: unknown key",
    ),
    (
        "escalation-bad-duration",
        "escalation:\n  cadence:\n    second_nudge: 3 days\n",
        "r.yaml:6 escalation.cadence.second_nudge: not a duration",
    ),
    (
        "escalation-unknown-specialty-timer",
        "escalation:\n  specialties:\n    cardiology: {third_nudge: 2d}\n",
        "r.yaml:6 escalation.specialties.cardiology.third_nudge: unknown timer",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "expected"), SECTION_CASES, ids=[c[0] for c in SECTION_CASES]
)
def test_reserved_section_errors(case: str, text: str, expected: str) -> None:
    head = "version: 1\nsources:\n  ehr: {type: mllp, port: 0}\n"
    with pytest.raises(ConfigError) as info:
        compile_config(config.loads(head + text, file="r.yaml"))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_together() -> None:
    text = _text(
        """\
        - name: a
          from: nowhere
          extract: {placer_number: bad path}
          then: [{track: nothing}]
        """
    )
    with pytest.raises(ConfigError) as info:
        compile_config(config.loads(text, file="r.yaml"))
    assert len(info.value.problems) == 3


def test_routes_check_cli_prints_problems_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(_text(CASES[0][1]))
    result = CliRunner().invoke(main, ["routes", "check", str(path)])
    assert result.exit_code == 2
    assert f"{path}:15 routes[0].thne: unknown key" in result.output


def test_routes_check_cli_accepts_the_shipped_file() -> None:
    root = Path(__file__).resolve().parent.parent
    result = CliRunner().invoke(main, ["routes", "check", str(root / "routes.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_sms_template_may_name_the_specialty_when_the_practice_allows_it() -> None:
    sections = (
        "practice:\n  name: Clinic\n  sms_may_name_specialty: true\n"
        "channels:\n  sms:\n    type: sms\n    auth_token: ${env:T:-x}\n    templates:\n"
        "      remind: 'Your {{ specialty_category }} referral. Reply STOP'\n"
    )
    text = "version: 1\n" + sections + "routes:\n  - name: a\n    then: [{drop: fine}]\n"
    table = compile_config(config.loads(text, file="r.yaml"))
    assert table.practice.sms_may_name_specialty
    assert "remind" in table.channels["sms"].templates
