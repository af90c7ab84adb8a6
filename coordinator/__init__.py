"""The coordinator, in two halves: the model side (:mod:`coordinator.model`: SGP, ODA, tiers,
packaging, export, evaluation) and the run side (:mod:`coordinator.run`: rounds, server,
checkpoints, aggregation, reports), with the command line, the configuration and the wiring
(:mod:`coordinator.cli`, :mod:`coordinator.settings`, :mod:`coordinator.launch`) on top."""
