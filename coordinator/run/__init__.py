"""The coordinator's run side: the round machine, the server loop, checkpoints, inbound checks,
aggregation, reports and broker logins.

Nothing here touches a model: no module in this package imports :mod:`coordinator.model`.
The server asks the model side for tiers, adapters and re-alignments through the
:class:`coordinator.run.server.ModelSide` protocol, which
:class:`coordinator.model.pipeline.ModelPipeline` implements.
"""
