"""SMS templates that cannot carry PHI: an allow-listed context, checked twice.

An SMS template may name only these variables (DESIGN.md, "PHI never leaves through
SMS"; referral-standards.md §7):

| variable             | value                                                        |
|----------------------|--------------------------------------------------------------|
| practice_name        | the practice's name (config ``practice.name``)               |
| practice_phone       | the practice's phone number (config ``practice.phone``)      |
| booking_link         | the practice's booking URL (no patient identifiers in it)    |
| greeting             | a first-name-free greeting ("Hello")                         |
| specialty_category   | only where ``practice.sms_may_name_specialty: true``         |

1. **Statically** (``refloop routes check``): :func:`check_sms_template` parses the
   template and rejects any other variable, any attribute or item access
   (``x.y``, ``x['y']``), any call, filter outside a short allow-list, and
   ``include``/``import``/``extends``/macros (which could reach other data).
2. **At render time**: the Jinja environment is sandboxed, has no globals and uses
   ``StrictUndefined``; the context holds only the allow-listed values, so a template
   that reaches for anything else raises :class:`SmsTemplateError` (a non-retryable
   :class:`~engine.errors.ChannelError`). Each rendered body must then be GSM-7, at most
   ``max_chars`` characters, and carry the opt-out wording
   (:func:`channels.sms.sms_body_problems`).

The automated voice channel (channels.voice) speaks templates under the same allow-list
and the same two checks; only the body rules differ (``body_rules``).

Error messages name the template and the variable, never a value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from channels.sms.twilio import GSM7_SINGLE, OPT_OUT_CONFIRMATION, sms_body_problems
from engine.errors import ChannelError

ALLOWED_VARIABLES: Final = frozenset(
    {"practice_name", "practice_phone", "booking_link", "greeting"}
)
SPECIALTY_VARIABLE: Final = "specialty_category"
# Filters that only reshape the allow-listed strings.
ALLOWED_FILTERS: Final = frozenset({"upper", "lower", "title", "capitalize", "trim"})
TEMPLATE_SUFFIX: Final = ".txt"
# (body, template name, max_chars) -> what is wrong with the rendered body.
BodyRules = Callable[[str, str, int], list[str]]

# Node types that could reach data outside the allow-list, or other templates.
_FORBIDDEN_NODES: Final[dict[type[nodes.Node], str]] = {
    nodes.Getattr: "attribute access",
    nodes.Getitem: "item access",
    nodes.Call: "function calls",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
    nodes.Extends: "extends",
    nodes.Macro: "macros",
    nodes.CallBlock: "call blocks",
    nodes.ContextReference: "context references",
    nodes.DerivedContextReference: "context references",
    nodes.EnvironmentAttribute: "environment attributes",
    nodes.ExtensionAttribute: "extension attributes",
    nodes.ImportedName: "imported names",
    nodes.InternalName: "internal names",
}


class SmsTemplateError(ChannelError):
    """An SMS template broke the allow-list or the body rules; never retryable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retryable=False)


@dataclass(frozen=True, slots=True)
class SmsContext:
    """Everything an SMS template may see. Built from practice config, never from a
    referral, except ``specialty_category`` (used only where the practice allows it)."""

    practice_name: str
    practice_phone: str
    booking_link: str = ""
    greeting: str = "Hello"
    specialty_category: str = ""


def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.clear()  # no range(), lipsum(), dict(), namespace(), cycler(), joiner()
    return env


_ENV: Final = _environment()


@functools.lru_cache(maxsize=256)
def _compiled(source: str, allow_specialty: bool) -> tuple[tuple[str, ...], Template | None]:
    """The template's problems, or its compiled form: checked and compiled once per
    source text, not on every text sent (the sources are the few in routes.yaml and
    templates/sms/)."""
    problems = tuple(check_sms_template(source, allow_specialty))
    return problems, (None if problems else _ENV.from_string(source))


def allowed_variables(allow_specialty: bool) -> frozenset[str]:
    """The allow-list in force for a practice."""
    return ALLOWED_VARIABLES | {SPECIALTY_VARIABLE} if allow_specialty else ALLOWED_VARIABLES


def check_sms_template(source: str, allow_specialty: bool = False) -> list[str]:
    """Every reason ``source`` is not a safe SMS template (empty list: safe).

    Static: needs no context. Used by ``refloop routes check`` and again before every
    render. Messages name variables and constructs, never values.
    """
    env = _environment()
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        return [f"line {exc.lineno}: template syntax error: {exc.message}"]
    problems: list[str] = []
    allowed = allowed_variables(allow_specialty)
    for name in sorted(meta.find_undeclared_variables(ast)):
        if name == SPECIALTY_VARIABLE and not allow_specialty:
            problems.append(
                f"'{name}' is not allowed in SMS unless practice.sms_may_name_specialty is true"
            )
        elif name not in allowed:
            problems.append(f"'{name}' is not in the SMS allow-list ({', '.join(sorted(allowed))})")
    # Names the template sets itself ({% set %}, {% for %} targets) may be read back;
    # every other name read must be allow-listed. This also catches the names
    # find_undeclared_variables leaves out (``self``, ``loop``, ``caller``).
    stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for name_node in ast.find_all(nodes.Name):
        name = name_node.name
        known = name in allowed | stored or any(f"'{name}'" in p for p in problems)
        if name_node.ctx == "load" and not known:
            problems.append(f"line {name_node.lineno}: '{name}' is not in the SMS allow-list")
    seen: set[str] = set()
    for node in ast.find_all(nodes.Node):
        for kind, label in _FORBIDDEN_NODES.items():
            if isinstance(node, kind) and label not in seen:
                seen.add(label)
                problems.append(f"line {node.lineno}: {label}: not allowed in SMS templates")
        if isinstance(node, nodes.Filter | nodes.Test) and node.name not in ALLOWED_FILTERS:
            what = "filter" if isinstance(node, nodes.Filter) else "test"
            problems.append(f"line {node.lineno}: {what} '{node.name}' is not allowed")
    return problems


def sms_rules(body: str, name: str, max_chars: int) -> list[str]:
    """The SMS body rules (GSM-7, length, opt-out wording; START for the opt-out
    confirmation)."""
    return sms_body_problems(
        body, max_chars=max_chars, opt_out_confirmation=name == OPT_OUT_CONFIRMATION
    )


class SmsTemplates:
    """The SMS template set of a practice: a directory of ``*.txt`` files.

    ``allow_specialty`` is ``practice.sms_may_name_specialty``; ``max_chars`` the body
    limit in GSM-7 characters (``channels.sms.max_chars``, default 160). ``body_rules``
    checks each rendered body (default: the SMS rules; the voice channel passes its own);
    ``label`` names the template set in errors.
    """

    def __init__(
        self,
        directory: Path,
        *,
        allow_specialty: bool = False,
        max_chars: int = GSM7_SINGLE,
        body_rules: BodyRules = sms_rules,
        label: str = "sms",
    ) -> None:
        self.directory = directory
        self.allow_specialty = allow_specialty
        self.max_chars = max_chars
        self.body_rules = body_rules
        self.label = label

    def names(self) -> list[str]:
        """Template names (file stems), sorted."""
        return sorted(p.stem for p in self.directory.glob(f"*{TEMPLATE_SUFFIX}"))

    def source(self, name: str) -> str:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise SmsTemplateError(f"sms template name {name!r} is not a plain name")
        path = self.directory / f"{name}{TEMPLATE_SUFFIX}"
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            raise SmsTemplateError(f"{self.label} template {name!r} not found") from None

    def check(self, sample: SmsContext | None = None) -> list[str]:
        """Problems of every template, each prefixed with its file name. With a
        ``sample`` context (the practice's real values), each is also rendered and its
        body checked (length, GSM-7, opt-out wording)."""
        problems: list[str] = []
        for name in self.names():
            label = f"{self.directory / (name + TEMPLATE_SUFFIX)}"
            found = check_sms_template(self.source(name), self.allow_specialty)
            problems.extend(f"{label}: {p}" for p in found)
            if sample is not None and not found:
                try:
                    self.render(name, sample)
                except SmsTemplateError as exc:
                    problems.append(f"{label}: {exc}")
        return problems

    def context(self, ctx: SmsContext) -> dict[str, str]:
        """The only values a template can see: the allow-list, and the specialty category
        only where the practice allows it."""
        context = {
            "practice_name": ctx.practice_name,
            "practice_phone": ctx.practice_phone,
            "booking_link": ctx.booking_link,
            "greeting": ctx.greeting,
        }
        if self.allow_specialty:
            context[SPECIALTY_VARIABLE] = ctx.specialty_category
        return context

    def render(self, name: str, ctx: SmsContext) -> str:
        """Render template ``name`` with the allow-listed context. Raises
        :class:`SmsTemplateError` if the template is unsafe or the body breaks a rule."""
        return self.render_source(self.source(name), ctx, name=name)

    def render_source(self, source: str, ctx: SmsContext, *, name: str = "<string>") -> str:
        """Render ``source`` (as :meth:`render`); ``name`` is used in errors and picks the
        opt-out-confirmation rule for :data:`OPT_OUT_CONFIRMATION`."""
        what = f"{self.label} template {name!r}"
        problems, template = _compiled(source, self.allow_specialty)
        if problems:
            raise SmsTemplateError(f"{what}: {problems[0]}")
        assert template is not None
        try:
            body = template.render(self.context(ctx))
        except UndefinedError as exc:
            # the message names the missing variable (a template name, not a value)
            raise SmsTemplateError(f"{what}: {exc.message}") from None
        except SecurityError:
            raise SmsTemplateError(f"{what}: unsafe operation") from None
        body = " ".join(body.split())
        body_problems = self.body_rules(body, name, self.max_chars)
        if body_problems:
            raise SmsTemplateError(f"{what}: {body_problems[0]}")
        return body
