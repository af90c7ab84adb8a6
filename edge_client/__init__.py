"""The edge client: hardware probe, preflight, sub-LLM fetch, QLoRA training and update upload."""
