"""The engine side: the contract (:mod:`.protocol`), the vLLM backend and its Serve deployment.

vLLM is imported by :mod:`.vllm_engine` and :mod:`.openai_serving` (inside methods, when an
engine is created) and by :mod:`.simulated` (at import; only :mod:`.vllm_engine` imports it).
"""
