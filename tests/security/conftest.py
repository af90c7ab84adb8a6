"""Fixtures for the security tests: a throw-away PKI and a credentials store with two clients.

The PKI is the README's TLS worked example, command for command (``openssl`` CLI, EC keys so
it takes a fraction of a second): a CA, a server certificate for ``localhost`` /
``127.0.0.1`` signed by it, and a client certificate for mutual TLS.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.run.brokers import BrokerEndpoint, broker_for
from coordinator.run.credentials import CredentialStore
from coordinator.settings import BrokerSettings
from shared.credentials import ClientCredentials

# The README's worked example (Security > TLS), with the server's names set for this machine.
PKI_COMMANDS = [
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365"
    " -keyout ca.key -out ca.pem -subj /CN=fedsoda-ca",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    " -keyout server.key -out server.csr -subj /CN=localhost",
    "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365"
    " -out server.pem -extfile server.ext",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    " -keyout client.key -out client.csr -subj /CN=jetson-07",
    "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 -out client.pem",
]
SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with ca.pem, server.pem/.key (localhost, 127.0.0.1) and client.pem/.key, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    (folder / "server.ext").write_text(SERVER_EXT)
    for command in PKI_COMMANDS:
        subprocess.run(command.split(), cwd=folder, check=True, capture_output=True)
    return folder


@dataclass(frozen=True)
class Enrolled:
    """A credentials store with clients alice and mallory (their passwords, as issued)."""

    store: CredentialStore
    alice: ClientCredentials
    mallory: ClientCredentials


@pytest.fixture
def enrolled(tmp_path: Path) -> Enrolled:
    """A fresh store in a temp folder with two enrolled clients."""
    store = CredentialStore(tmp_path / "credentials")
    return Enrolled(store, store.add("alice"), store.add("mallory"))


@pytest.fixture
def secure_broker(enrolled: Enrolled, tmp_path: Path) -> Iterator[Callable[..., BrokerEndpoint]]:
    """``secure_broker(**broker_settings)``: a running ``mode = "mosquitto"`` broker on ``enrolled``'s store.

    Started through :func:`coordinator.run.brokers.broker_for`, exactly as ``serve`` starts it.
    """
    stack: list = []

    def start(**settings: object) -> BrokerEndpoint:
        config = BrokerSettings(mode="mosquitto", port=0, credentials_dir=str(enrolled.store.directory), **settings)  # type: ignore[arg-type]
        context = broker_for(config, lambda _m: None, tmp_path / f"broker{len(stack)}")
        endpoint = context.__enter__()
        stack.append(context)
        return endpoint

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)
