"""The model router: a virtual model (e.g. ``auto``) picks a real one by a heuristic policy.

Rules are tried in order and the first whose conditions all hold names the model
(prompt length in characters, keywords as whole words, tools requested); no rule
matching means the router's default. The chosen model comes first in the list of
candidates, then the router's fallbacks (the proxy tries them in order when a
model is down or overloaded), then the default if it is not in the list yet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.gateway.config import RouterConfig, RouteRule


@dataclass(frozen=True)
class Route:
    """Where a request goes: candidates in order, and which rule decided."""

    candidates: tuple[str, ...]
    rule: str  # "default", or "rule<i>:<conditions>"


def request_text(body: dict) -> str:
    """The prompt text of a completions, chat or embeddings body (for routing and hashing)."""
    if "messages" in body:
        parts = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            parts.append(f"{message.get('role', '')}\n{content_text(message.get('content'))}\n")
        return "".join(parts)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(p for p in prompt if isinstance(p, str))
    return ""


def content_text(content) -> str:
    """A chat message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9_']+", text.lower()))


class ModelRouter:
    """Route requests for one virtual model."""

    def __init__(self, config: RouterConfig):
        self.config = config

    def _matches(self, rule: RouteRule, text: str, words: set[str], tools: bool) -> bool:
        if rule.min_prompt_chars is not None and len(text) < rule.min_prompt_chars:
            return False
        if rule.max_prompt_chars is not None and len(text) > rule.max_prompt_chars:
            return False
        if rule.keywords and not any(
                (k in words) if " " not in k else (k in text.lower()) for k in rule.keywords):
            return False
        return not (rule.tools is not None and rule.tools != tools)

    def route(self, body: dict) -> Route:
        text = request_text(body)
        words = _words(text)
        tools = bool(body.get("tools") or body.get("functions"))
        chosen, rule_name = self.config.default, "default"
        for i, rule in enumerate(self.config.rules):
            if self._matches(rule, text, words, tools):
                chosen, rule_name = rule.model, f"rule{i}:{rule.describe()}"
                break
        candidates = [chosen]
        for name in (*self.config.fallbacks, self.config.default):
            if name not in candidates:
                candidates.append(name)
        return Route(tuple(candidates), rule_name)
