"""The credentials store and its command lines, without a broker (a broker checks them in the other tests).

Passwords are random, shown once and stored only as mosquitto ``$7$`` hashes (the same bytes
``mosquitto_passwd`` computes); files holding secrets are private; the ACL gives each client
its own topics only; the device's credentials file round-trips and feeds ``join``.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.run.credentials import CredentialStore, acl_text
from coordinator.settings import RunConfig
from edge_client.cli import app as client_app
from shared.config import load_config
from shared.credentials import (
    ClientCredentials,
    load_client_credentials,
    mosquitto_password_hash,
    write_client_credentials,
)
from shared.errors import ConfigError
from shared.protocol import COORDINATOR_ID
from shared.signing import SigningKey, load_or_create_signing_key

runner = CliRunner()


# The CLI configures root logging for a terminal; the fixture puts it back for the tests that follow.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd to compare with")
def test_hashes_are_byte_for_byte_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    import base64

    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "alice", "s3cret pass"], check=True, capture_output=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    _, seven, iterations, salt, _digest = theirs.split("$")
    assert seven == "7"
    ours = mosquitto_password_hash("s3cret pass", salt=base64.b64decode(salt), iterations=int(iterations))
    assert ours == theirs
    assert mosquitto_password_hash("other", salt=base64.b64decode(salt), iterations=int(iterations)) != theirs


def test_add_list_revoke_keep_only_hashes_in_private_files(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "creds")
    alice = store.add("alice", broker="10.0.0.1:8883")
    bob = store.add("bob")
    assert alice.username == "alice" and len(alice.password) >= 32 and alice.password != bob.password
    assert alice.broker == "10.0.0.1:8883"
    store.coordinator_credentials()
    files = {p.name: p for p in store.directory.iterdir()}
    for name in ("clients.json", "passwd", "acl", "coordinator.toml"):
        assert stat.S_IMODE(files[name].stat().st_mode) == 0o600, name
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    # The client passwords exist nowhere in the store.
    for path in files.values():
        text = path.read_text()
        assert alice.password not in text and bob.password not in text
    users = [line.split(":", 1)[0] for line in store.passwd_file.read_text().splitlines()]
    assert users == ["alice", "bob", COORDINATOR_ID]
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in store.passwd_file.read_text().splitlines())

    revoked = store.revoke("bob")
    assert not revoked.active and revoked.revoked
    assert [(c.client_id, c.active) for c in store.clients()] == [("alice", True), ("bob", False)]
    assert "bob" not in store.passwd_file.read_text() and "user bob" not in store.acl_file.read_text()

    with pytest.raises(ConfigError, match="already has credentials"):
        store.add("alice")
    with pytest.raises(ConfigError, match="already revoked"):
        store.revoke("bob")
    with pytest.raises(ConfigError, match="no credentials for client 'carol'.*known: alice, bob"):
        store.revoke("carol")
    with pytest.raises(ConfigError, match="coordinator's own user"):
        store.add(COORDINATOR_ID)
    with pytest.raises(ConfigError, match="client id 'a/b'"):
        store.add("a/b")
    again = store.add("bob")  # re-enrolment issues a new password
    assert again.password != bob.password and "bob:" in store.passwd_file.read_text()
    # The coordinator's own login is created once and kept.
    assert store.coordinator_credentials() == store.coordinator_credentials()


def test_the_acl_pins_each_client_to_its_own_topics() -> None:
    text = acl_text(["jetson-07"])
    blocks: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("user "):
            user = line
            blocks[user] = []
        elif line.startswith("topic "):
            blocks[user].append(line)
    blocks = {user: sorted(lines) for user, lines in blocks.items()}
    assert blocks["user jetson-07"] == sorted([
        "topic write fedsoda/v1/+/hello/jetson-07",
        "topic write fedsoda/v1/+/chunkreq/jetson-07",
        "topic write fedsoda/v1/+/update/jetson-07",
        "topic write fedsoda/v1/+/presence/jetson-07",
        "topic read fedsoda/v1/+/schedule",
        "topic read fedsoda/v1/+/manifest/+",
        "topic read fedsoda/v1/+/adapter",
        "topic read fedsoda/v1/+/assign/jetson-07",
        "topic read fedsoda/v1/+/chunk/jetson-07",
        "topic read fedsoda/v1/+/nack/jetson-07",
    ])
    coordinator = blocks[f"user {COORDINATOR_ID}"]
    assert "topic write fedsoda/v1/+/schedule" in coordinator and "topic read fedsoda/v1/+/update/+" in coordinator
    assert not [line for line in coordinator if line.startswith("topic readwrite")]


def test_the_device_file_round_trips_and_bad_files_name_the_problem(tmp_path: Path, pki: Path) -> None:
    creds = ClientCredentials("jetson-07", "jetson-07", "pw", broker="coord.example:8883", ca_pem=(pki / "ca.pem").read_text())
    path = write_client_credentials(tmp_path / "c.toml", creds, comment="hand this over")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_client_credentials(path) == creds
    ca = creds.ca_file(tmp_path / "state")
    assert ca is not None and ca.read_text() == (pki / "ca.pem").read_text()
    assert ClientCredentials("a", "a", "p").ca_file(tmp_path / "x") is None

    (tmp_path / "bad.toml").write_text('client_id = "x"\nusername = "x"\npasword = "typo"\n')
    with pytest.raises(ConfigError, match=r"(?s)bad\.toml.*pasword: unknown key.*password: required field"):
        load_client_credentials(tmp_path / "bad.toml")
    (tmp_path / "ca.toml").write_text('client_id = "x"\nusername = "x"\npassword = "p"\nca_pem = "nope"\n')
    with pytest.raises(ConfigError, match="ca_pem is not a PEM certificate"):
        load_client_credentials(tmp_path / "ca.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_client_credentials(tmp_path / "missing.toml")


def test_cli_add_list_revoke(tmp_path: Path, pki: Path) -> None:
    store = tmp_path / "creds"
    out = tmp_path / "alice.toml"
    result = runner.invoke(coordinator_app, ["credentials", "add", "alice", "--broker", "coord.example:8883",
                                             "--ca-file", str(pki / "ca.pem"), "--dir", str(store), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    creds = load_client_credentials(out)
    assert shown["password"] == creds.password and creds.broker == "coord.example:8883" and creds.ca_pem
    # The file pins the coordinator's signing key, the one in the credentials folder.
    assert creds.coordinator_key == shown["coordinator_key"] == (store / "coordinator.pub").read_text().strip()
    assert load_or_create_signing_key(store / "coordinator-signing.key").public.text == creds.coordinator_key
    assert "no local broker runs on these files" in result.stderr

    again = runner.invoke(coordinator_app, ["credentials", "add", "alice", "--broker", "x:1", "--dir", str(store), "--out", str(out)])
    assert again.exit_code == ConfigError.exit_code and "exists" in again.output
    result = runner.invoke(coordinator_app, ["credentials", "add", "alice", "--broker", "x:1", "--dir", str(store), "--out", str(tmp_path / "a2.toml")])
    assert result.exit_code == ConfigError.exit_code and "already has credentials" in result.output

    result = runner.invoke(coordinator_app, ["credentials", "revoke", "alice", "--dir", str(store)])
    assert result.exit_code == 0 and "revoked" in result.output
    listed = runner.invoke(coordinator_app, ["credentials", "list", "--dir", str(store), "--json"])
    assert [(c["client_id"], c["active"]) for c in json.loads(listed.stdout)] == [("alice", False)]
    table = runner.invoke(coordinator_app, ["credentials", "list"], env={"FEDSODA_BROKER__CREDENTIALS_DIR": str(store)})
    assert "alice" in table.output and "revoked" in table.output


def test_join_takes_the_login_from_the_credentials_file_only(tmp_path: Path) -> None:
    path = write_client_credentials(tmp_path / "c.toml", ClientCredentials("jetson-07", "jetson-07", "pw", broker="127.0.0.1:1"))
    base = ["join", "--data", str(tmp_path / "none.jsonl"), "--credentials", str(path)]
    result = runner.invoke(client_app, [*base, "--password", "other"])
    assert result.exit_code == ConfigError.exit_code and "drop --username/--password" in result.output
    result = runner.invoke(client_app, [*base, "--client-id", "jetson-08"])
    assert result.exit_code == ConfigError.exit_code and "not the credentials file's client 'jetson-07'" in result.output
    (tmp_path / "broken.toml").write_text("client_id = \n")
    result = runner.invoke(client_app, ["join", "--data", "x.jsonl", "--credentials", str(tmp_path / "broken.toml")])
    assert result.exit_code == ConfigError.exit_code and "broken.toml" in result.output
    # The file carries no coordinator key and none is given: refused, naming both ways to pin one.
    result = runner.invoke(client_app, base, env={"FEDSODA_COORDINATOR_KEY": ""})
    assert result.exit_code == ConfigError.exit_code and "no coordinator key is pinned" in " ".join(result.output.split())
    pinned = write_client_credentials(tmp_path / "k.toml", ClientCredentials(
        "jetson-07", "jetson-07", "pw", broker="127.0.0.1:1", coordinator_key=SigningKey.generate().public.text))
    result = runner.invoke(client_app, ["join", "--data", str(tmp_path / "none.jsonl"), "--credentials", str(pinned)])
    assert result.exit_code == 9 and "none.jsonl" in result.output  # past the key: the data file is what is missing


def test_broker_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[broker]\nmode = "embedded"\nserver_cert_file = "s.pem"\n')
    with pytest.raises(ConfigError, match=r"broker: .*apply only to mode = 'mosquitto'.*go together"):
        load_config(RunConfig, config, env={})
    config.write_text('[broker]\nmode = "mosquitto"\nrequire_client_cert = true\n')
    with pytest.raises(ConfigError, match="require_client_cert needs"):
        load_config(RunConfig, config, env={})
    config.write_text('[broker]\nmode = "tls"\n')
    with pytest.raises(ConfigError, match="broker.mode"):
        load_config(RunConfig, config, env={})
