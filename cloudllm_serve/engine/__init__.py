"""The engine side: the contract (:mod:`.protocol`), the vLLM backend and its Serve deployment.

Only :mod:`.vllm_engine` imports vLLM, and only when an engine is created.
"""
