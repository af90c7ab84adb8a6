"""The coordinator: SGP pruning, ODA alignment, sub-LLM packaging, round scheduling and FedAvg."""
