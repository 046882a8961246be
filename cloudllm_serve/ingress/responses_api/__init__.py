"""OpenAI's Responses API: vLLM answers, we keep the responses (Redis, per tenant)."""
