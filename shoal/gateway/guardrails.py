"""Guardrails: PII and prompt-injection filters on input, blocked terms and PII on output.

Input: e-mail addresses, phone numbers and card numbers (13-19 digits passing the
Luhn check) are each ``off``, ``redact`` (replaced by ``[EMAIL]``, ``[PHONE]``,
``[CARD]`` before the engine sees the prompt) or ``reject`` (a 400 naming the
filter); prompt-injection patterns (a built-in list plus the config's) reject.

Output: a blocked term ends the choice where it would begin (OpenAI's
``finish_reason: "content_filter"``), PII is redacted. On streams a
``StreamFilter`` per choice holds back a tail as long as the longest term (or
PII match) could be, so no part of a blocked span ever leaves the gateway.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from shoal.gateway.config import InputGuardConfig, OutputGuardConfig

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# not part of a longer run of digit groups (a card or account number is no phone number)
PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]?\d{3,4}(?!\w)(?![ .-]\d)")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}
INJECTION_PATTERNS = (
    r"ignore (?:all |any )?(?:the )?(?:previous|prior|above) (?:instructions|prompts?|rules)",
    r"disregard (?:all |any )?(?:the )?(?:previous|prior|above|your) (?:instructions|rules)",
    r"(?:reveal|print|show|repeat) (?:me )?(?:your|the) (?:system|hidden) prompt",
    r"you are now (?:in )?(?:dan|developer mode|jailbroken)",
    r"pretend (?:that )?you have no (?:rules|restrictions|guidelines)",
)
MAX_PII_SPAN = 64  # characters a PII match on output may span (the stream hold-back for it)


def luhn_ok(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if double:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        double = not double
    return total % 10 == 0


def _cards(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            spans.append(m.span())
    return spans


def pii_spans(text: str, kinds=("email", "phone", "card")) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` of every PII match, non-overlapping, in order."""
    found = []
    if "email" in kinds:
        found += [(*m.span(), "email") for m in EMAIL.finditer(text)]
    if "card" in kinds:
        found += [(s, e, "card") for s, e in _cards(text)]
    if "phone" in kinds:
        found += [(*m.span(), "phone") for m in PHONE.finditer(text)
                  if sum(c.isdigit() for c in m.group()) >= 7]
    found.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    spans, end = [], -1
    for s in found:  # the first (longest) match at a position wins; cards before phones
        if s[0] >= end:
            spans.append(s)
            end = s[1]
    return spans


def redact(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, pos = [], 0
    for start, end, kind in spans:
        out.append(text[pos:start])
        out.append(PLACEHOLDERS[kind])
        pos = end
    out.append(text[pos:])
    return "".join(out)


class GuardrailRejection(Exception):
    """A request or reply the guardrails refuse; ``filter`` names which one."""

    def __init__(self, filter_name: str, message: str):
        super().__init__(message)
        self.filter = filter_name


@dataclass
class InputVerdict:
    """What the input guard did: filter name -> decision (``redacted``, ``pass``)."""

    decisions: dict[str, str] = field(default_factory=dict)

    def header(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.decisions.items())) or "none"


class InputGuard:
    """Checks and rewrites the text of a request body in place."""

    def __init__(self, config: InputGuardConfig):
        self.config = config
        patterns = INJECTION_PATTERNS + tuple(config.injection_patterns)
        self.injection = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE)

    def _text(self, text: str, verdict: InputVerdict) -> str:
        cfg = self.config
        if cfg.injection == "reject" and self.injection.search(text):
            verdict.decisions["injection"] = "rejected"
            raise GuardrailRejection("injection", "the prompt matches a prompt-injection "
                                     "pattern and was refused by the gateway's guardrails")
        kinds = [k for k in ("email", "phone", "card") if getattr(cfg, k) != "off"]
        if not kinds:
            return text
        spans = pii_spans(text, kinds)
        for kind in kinds:
            if any(s[2] == kind for s in spans):
                if getattr(cfg, kind) == "reject":
                    verdict.decisions[kind] = "rejected"
                    raise GuardrailRejection(kind, f"the prompt contains a {kind} "
                                             "(personal data), which this gateway refuses")
                verdict.decisions[kind] = "redacted"
            else:
                verdict.decisions.setdefault(kind, "pass")
        return redact(text, spans) if spans else text

    def apply(self, body: dict) -> InputVerdict:
        """Filter every prompt text of ``body`` in place; GuardrailRejection to refuse it."""
        verdict = InputVerdict()
        if self.config == InputGuardConfig():
            return verdict
        if self.config.injection == "reject":
            verdict.decisions["injection"] = "pass"
        for key in ("prompt", "input"):
            value = body.get(key)
            if isinstance(value, str):
                body[key] = self._text(value, verdict)
            elif isinstance(value, list):
                body[key] = [self._text(v, verdict) if isinstance(v, str) else v for v in value]
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = self._text(content, verdict)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        part["text"] = self._text(part["text"], verdict)
        return verdict


class StreamFilter:
    """Output filter of one choice's text as it streams.

    ``feed`` takes the next piece and answers what may be sent now; ``finish``
    flushes the held tail. Once a blocked term is seen, ``blocked`` is set and
    everything from the term on is dropped.
    """

    def __init__(self, config: OutputGuardConfig):
        self.terms = [t.lower() for t in config.blocked_terms]
        self.pii = config.pii == "redact"
        longest = max((len(t) for t in self.terms), default=0)
        self.hold = max(longest - 1, MAX_PII_SPAN if self.pii else 0)
        self.pending = ""
        self.blocked = False
        self.redactions = 0

    def _first_term(self, text: str) -> int:
        low = text.lower()
        hits = [i for i in (low.find(t) for t in self.terms) if i >= 0]
        return min(hits, default=-1)

    def _release(self, final: bool) -> str:
        text = self.pending
        cut = len(text) if final else max(0, len(text) - self.hold)
        term_at = self._first_term(text)
        if term_at >= 0:
            self.blocked = True  # all before the term goes out, nothing after it
            text, self.pending = text[:term_at], ""
            cut = len(text)
        spans = pii_spans(text) if self.pii else []
        for start, end, _ in spans:  # never cut through a match
            if start < cut < end:
                cut = start
        out_spans = [s for s in spans if s[1] <= cut]
        self.redactions += len(out_spans)
        out = redact(text[:cut], out_spans)
        if not self.blocked:
            self.pending = text[cut:]
        return out

    def feed(self, piece: str) -> str:
        if self.blocked:
            return ""
        self.pending += piece
        return self._release(final=False)

    def finish(self) -> str:
        if self.blocked:
            return ""
        return self._release(final=True)


def filter_text(config: OutputGuardConfig, text: str) -> tuple[str, bool, int]:
    """A whole reply filtered: (text, blocked, number of redactions)."""
    f = StreamFilter(config)
    out = f.feed(text) + f.finish()
    return out, f.blocked, f.redactions
