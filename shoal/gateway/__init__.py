"""shoal gateway: keys and limits, model router, replica routing, semantic cache, guardrails and cost in front of OpenAI-compatible engines."""
