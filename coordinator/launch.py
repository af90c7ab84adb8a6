"""Wiring for ``serve`` (and ``simulate``): broker, model side, transport, server.

The one place where the coordinator's two halves meet: it prepares the model side
(:class:`coordinator.model.pipeline.ModelPipeline`) and hands it to the run side's server
(:class:`coordinator.run.server.CoordinatorServer`) as its ``ModelSide``. Kept apart from
:mod:`coordinator.cli` so the one-machine simulation runs exactly the code path a user's
``serve`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from coordinator.model.pipeline import ModelPipeline, Progress
from coordinator.run.aggregation import get_strategy
from coordinator.run.brokers import broker_for, coordinator_client_id
from coordinator.run.server import CoordinatorServer, RunOutcome
from coordinator.settings import RunConfig, effective_config
from shared.transport import MqttTransport

log = logging.getLogger(__name__)


def serve_run(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Progress = lambda _m: None,
    on_broker: Callable[[str, int], None] | None = None,
) -> RunOutcome:
    """Prepare the tiers, connect, and serve the run to its end.

    Args:
        config: Run configuration.
        run_dir: Run directory.
        resume: Carry on from the run directory's checkpoint.
        progress: Status messages for the long steps.
        on_broker: Called with the broker address once it is up (``simulate`` starts its
            clients there, so they download while the coordinator is still preparing).

    Returns:
        How the run ended.
    """
    config = effective_config(config)
    get_strategy(config.aggregation.strategy)  # an unknown name fails now, not after the tiers are built
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One MQTT client id per run folder: a resumed coordinator gets its broker session back.
    client_id = coordinator_client_id(run_dir)
    with broker_for(config.broker, progress, run_dir / "broker", client_id=client_id) as broker:
        if on_broker is not None:
            on_broker(broker.host, broker.port)
        pipeline = ModelPipeline.prepare(config, run_dir, resume=resume, progress=progress)
        transport = MqttTransport(broker.coordinator)
        transport.connect()
        try:
            server = CoordinatorServer(config, run_dir, pipeline, transport, resume=resume)
            progress(f"serving run {config.run_id!r}: tiers {', '.join(pipeline.tiers)}; waiting for clients")
            return server.run()
        finally:
            transport.close()
