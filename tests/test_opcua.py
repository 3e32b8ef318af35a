"""The OPC UA server of a real daemon process, read with asyncua's client (the `opcua` extra)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from tests.daemon_helpers import Output, start_station, write_config

asyncua = pytest.importorskip("asyncua")
from asyncua import Client, ua  # noqa: E402
from asyncua.crypto import security_policies  # noqa: E402
from asyncua.crypto.cert_gen import setup_self_signed_certificate  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

VERDICT = "ns=2;s=Station.LastVerdict"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def certificate(folder, name: str, use):
    key, cert = folder / f"{name}.pem", folder / f"{name}.der"
    asyncio.run(
        setup_self_signed_certificate(
            key, cert, f"urn:inspection-station:{name}", "127.0.0.1", [use], {"commonName": name}
        )
    )
    return cert, key


async def connect(url: str, client_files, user: str | None, password: str | None) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = "urn:inspection-station:client"
    await client.set_security(
        security_policies.SecurityPolicyBasic256Sha256,
        str(client_files[0]),
        str(client_files[1]),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    await client.connect()
    return client


async def watch(url: str, client_files) -> list[tuple[str, int, int]]:
    """(LastVerdict, OkCount + NgCount, LastSeq) as read every 0.2 s until 30 parts were counted."""
    client = await connect(url, client_files, "scada", "s3cret-words")
    seen = []
    try:
        verdict, ok, ng, seq = (
            client.get_node(f"ns=2;s=Station.{n}") for n in ("LastVerdict", "OkCount", "NgCount", "LastSeq")
        )
        for _ in range(600):
            seen.append(
                (await verdict.read_value(), await ok.read_value() + await ng.read_value(), await seq.read_value())
            )
            if seen[-1][1] >= 30:
                break
            await asyncio.sleep(0.2)
        assert isinstance(await client.get_node("ns=2;s=Station.LastScore").read_value(), float)
        assert await client.get_node("ns=2;s=Station.Product").read_value() == "A"
    finally:
        await client.disconnect()
    return seen


async def refused(url: str, client_files, user, password) -> bool:
    try:
        client = await connect(url, client_files, user, password)
    except Exception:  # asyncua raises the server's Bad... status (or closes the channel)
        return True
    await client.disconnect()
    return False


def test_a_scada_client_reads_the_verdict_as_parts_are_judged(tmp_path, station_files, broker, sim_dataset):
    server_files = certificate(tmp_path, "server", ExtendedKeyUsageOID.SERVER_AUTH)
    client_files = certificate(tmp_path, "client", ExtendedKeyUsageOID.CLIENT_AUTH)
    users = tmp_path / "opcua-users"
    users.write_text("# user:password\nscada:s3cret-words\n")
    users.chmod(0o600)
    port = free_port()
    opcua = f"{{port: {port}, certificate: {server_files[0]}, private_key: {server_files[1]}, users_file: {users}}}"
    config = write_config(
        tmp_path, station_files, broker, f"{{source: {sim_dataset}, loop: true, fps: 20}}", opcua=opcua
    )
    process = start_station(config)
    output = Output(process)
    url = f"opc.tcp://127.0.0.1:{port}/station"
    try:
        output.wait_for("OPC UA server on", 60)
        seen = asyncio.run(watch(url, client_files))
        assert seen[-1][1] >= 30, seen[-5:]
        assert {verdict for verdict, _, _ in seen} - {""} <= {"OK", "NG"}
        counts = [count for _, count, _ in seen]
        assert counts == sorted(counts) and len(set(counts)) > 2  # read while parts were being judged
        assert seen[-1][2] >= 1
        # Without a user (anonymous is off) or with a wrong password: refused.
        assert asyncio.run(refused(url, client_files, None, None))
        assert asyncio.run(refused(url, client_files, "scada", "wrong"))
    finally:
        process.terminate()
        code = output.finish(30)
    assert code == 0, output.text


def test_unusable_opcua_files_are_named_by_check_and_stop_the_start(tmp_path, station_files, broker, sim_dataset):
    users = tmp_path / "users"
    users.write_text("no colon here\n")
    opcua = (
        f"{{port: {free_port()}, certificate: {tmp_path / 'missing.der'}, private_key: {tmp_path / 'missing.pem'}, "
        f"users_file: {users}}}"
    )
    config = write_config(tmp_path, station_files, broker, f"{{source: {sim_dataset}}}", opcua=opcua)
    check = subprocess.run(
        [sys.executable, "-m", "station", "check", "-c", str(config)], capture_output=True, text=True, timeout=120
    )
    assert check.returncode != 0
    assert f"opcua.users_file: {users}:1: expected user:password" in check.stdout + check.stderr
    assert "opcua.certificate:" in check.stdout + check.stderr and "does not exist" in check.stdout + check.stderr

    users.write_text("scada:pw\n")
    process = start_station(config)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 78 and "opcua: cannot load certificate" in out and "Traceback" not in out, out
