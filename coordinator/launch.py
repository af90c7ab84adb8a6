"""Wiring for ``serve`` (and ``simulate``): broker, model pipeline, transport, server.

Kept apart from :mod:`coordinator.cli` so the one-machine simulation runs exactly the code
path a user's ``serve`` runs, and apart from :mod:`coordinator.server` so the loop stays
about rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from coordinator.pipeline import ModelPipeline, Progress
from coordinator.server import COORDINATOR_ID, CoordinatorServer, RunOutcome
from coordinator.settings import BrokerSettings, RunConfig
from shared.broker import BrokerHandle, start_embedded_broker
from shared.transport import MqttTransport, TransportConfig

log = logging.getLogger(__name__)


def effective_config(config: RunConfig) -> RunConfig:
    """Apply what the strategy implies: only FedSODA re-aligns.

    Args:
        config: The loaded configuration.

    Returns:
        The configuration the run actually uses.
    """
    if config.pruning.strategy != "fedsoda" and config.rounds.realign_every:
        log.info("strategy %s does not re-align: ignoring rounds.realign_every", config.pruning.strategy)
        return dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, realign_every=0))
    return config


def transport_config(broker: BrokerSettings, host: str, port: int, client_id: str) -> TransportConfig:
    """A TransportConfig from broker settings (empty strings mean "not set").

    Args:
        broker: Credentials and TLS files.
        host: Broker host.
        port: Broker port.
        client_id: MQTT client id.

    Returns:
        The transport configuration.
    """
    return TransportConfig(
        host=host,
        port=port,
        client_id=client_id,
        username=broker.username or None,
        password=broker.password or None,
        ca_file=Path(broker.ca_file) if broker.ca_file else None,
        cert_file=Path(broker.cert_file) if broker.cert_file else None,
        key_file=Path(broker.key_file) if broker.key_file else None,
    )


@contextlib.contextmanager
def broker_for(settings: BrokerSettings, progress: Progress) -> Iterator[tuple[str, int]]:
    """Yield the broker address, starting the embedded broker for the block if configured.

    Args:
        settings: Broker settings.
        progress: Status messages.

    Yields:
        ``(host, port)`` of the broker to use.
    """
    if not settings.embedded:
        yield settings.host, settings.port
        return
    # Listens where the settings say: 127.0.0.1 keeps it private, 0.0.0.0 lets other machines in.
    handle: BrokerHandle = start_embedded_broker(port=settings.port, host=settings.host)
    progress(f"embedded MQTT broker listening on {handle.host}:{handle.port}")
    try:
        yield handle.host, handle.port
    finally:
        handle.close()


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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with broker_for(config.broker, progress) as (host, port):
        if on_broker is not None:
            on_broker(host, port)
        pipeline = ModelPipeline.prepare(config, run_dir, resume=resume, progress=progress)
        transport = MqttTransport(transport_config(config.broker, host, port, COORDINATOR_ID))
        transport.connect()
        try:
            server = CoordinatorServer(config, run_dir, pipeline, transport, resume=resume)
            progress(f"serving run {config.run_id!r}: tiers {', '.join(pipeline.tiers)}; waiting for clients")
            return server.run()
        finally:
            transport.close()
