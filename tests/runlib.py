"""What only the integration tests need on top of :mod:`benchmarks.harness`: following a
run's retained schedule over MQTT.
"""

from __future__ import annotations

from shared import codec, topics
from shared.protocol import Schedule
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage, TransportConfig


class ScheduleWatch:
    """Follows the retained schedule of a run over MQTT.

    Args:
        port: Broker port on 127.0.0.1.
        run_id: The run.
    """

    def __init__(self, port: int, run_id: str) -> None:
        self.latest: Schedule | None = None
        self.transport = MqttTransport(TransportConfig(host="127.0.0.1", port=port, client_id=f"watch-{run_id}")).connect()
        self.run_id = run_id
        self.transport.subscribe(topics.schedule(run_id), self._on)

    def _on(self, message: InboundMessage) -> None:
        self.latest = codec.decode_message(message.topic, message.payload, run=self.run_id)[1].body

    def running(self, round_: int) -> bool:
        """Whether the latest schedule says ``round_`` is running (polls the transport briefly)."""
        self.transport.poll(0.1)
        return self.latest is not None and self.latest.status == "running" and self.latest.round == round_

    def close(self) -> None:
        """Disconnect."""
        self.transport.close()
