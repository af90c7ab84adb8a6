"""The coordinator's model side: the full LLM, SGP, ODA, surgery, packaging, export and evaluation.

Everything here works on models and files and knows nothing of MQTT, rounds or clients:
no module in this package imports :mod:`coordinator.run`. The run side reaches it through
:class:`coordinator.model.pipeline.ModelPipeline` (built on the tier builder,
:mod:`coordinator.model.tiers`), wired together in :mod:`coordinator.launch`.
"""
