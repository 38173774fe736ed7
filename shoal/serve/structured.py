"""Request fields that constrain the output, as OpenAI and vLLM spell them.

OpenAI: ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema",
"json_schema": {"name": ..., "schema": {...}}}``, ``{"type": "text"}``) and
``logit_bias`` (token id strings -> bias). vLLM: ``structured_outputs`` (``json``,
``regex``, ``choice``, ``grammar``, ``json_object``) and the older ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``. At most one constraint per
request; the field that carried it is what an error names (``param`` of the
``RequestError``, which the protocol layer turns into a 400).
"""
from __future__ import annotations

from typing import Any

from shoal.engine.sampling_params import StructuredOutputsParams
from shoal.errors import RequestError

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def _response_format(fmt: dict[str, Any]) -> StructuredOutputsParams | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise RequestError("response_format json_schema needs json_schema.schema (an object)",
                              param="response_format")
        schema = spec["schema"]
        return StructuredOutputsParams(json={} if schema is True else schema)
    raise RequestError(f"response_format type must be text, json_object or json_schema, "
                      f"got {kind!r}", param="response_format")


def structured_outputs_of(body: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field that carried it (None, None for free text)."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    try:
        fmt = getattr(body, "response_format", None)
        if fmt:
            so = _response_format(fmt)
            if so is not None:
                found.append((so, "response_format"))
        raw = getattr(body, "structured_outputs", None)
        if raw:
            known = {"json", "regex", "choice", "grammar", "json_object"}
            unknown = set(raw) - known
            if unknown:
                raise RequestError(f"structured_outputs: unknown field(s) {sorted(unknown)}; "
                                  f"known: {sorted(known)}", param="structured_outputs")
            found.append((StructuredOutputsParams(**raw), "structured_outputs"))
        for name, kind in GUIDED.items():
            value = getattr(body, name, None)
            if value is not None:
                found.append((StructuredOutputsParams(**{kind: value}), name))
    except RequestError:
        raise
    except ValueError as exc:
        param = next((n for n in ("response_format", "structured_outputs", *GUIDED)
                      if getattr(body, n, None)), None)
        raise RequestError(str(exc), param=param) from None
    if len(found) > 1:
        raise RequestError("set at most one of " + ", ".join(p for _, p in found),
                          param=found[1][1])
    return found[0] if found else (None, None)


def logit_bias_of(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token id strings as keys) as token id -> bias."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}",
                              param="logit_bias") from None
        out[token] = value
    return out
