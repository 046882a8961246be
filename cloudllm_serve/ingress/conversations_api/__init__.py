"""OpenAI's Conversations API (``/v1/conversations``) over our conversation store."""
