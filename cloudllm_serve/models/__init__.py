"""Model preparation: turning offline sources into folders vLLM can load."""
