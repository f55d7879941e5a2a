"""Webhooks over HTTPS from a real `mhpo serve` to a real TLS receiver whose certificate a private
CA signs: delivered with `MHPO_WEBHOOK_CA_BUNDLE` naming that CA, refused (certificate not
trusted) without it, and a bad bundle refused at start naming the variable."""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from mhpo_server.monitoring.service import WebhookSettings
from tests.fixtures.server import LiveServer
from tests.flags.test_webhook_faults import ENV, RECEIVER_HOST, hooked_run, post_loss, settled, wait_for


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) as PEM files; the server's is for RECEIVER_HOST."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mhpo test CA"))
        .issuer_name(_name("mhpo test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(RECEIVER_HOST))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(RECEIVER_HOST))]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class TlsReceiver:
    """An HTTPS server on RECEIVER_HOST answering 204 to every POST; keeps the bodies."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((RECEIVER_HOST, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://{RECEIVER_HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca_and_server_cert(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def receiver(pki: tuple[Path, Path, Path]) -> Iterator[TlsReceiver]:
    made = TlsReceiver(pki[1], pki[2])
    yield made
    made.close()


@pytest.mark.parametrize("trusted", [True, False])
def test_https_receiver_signed_by_a_private_ca(
    tmp_path: Path, pki: tuple[Path, Path, Path], receiver: TlsReceiver, trusted: bool
) -> None:
    env = {**ENV, **({"MHPO_WEBHOOK_CA_BUNDLE": str(pki[0])} if trusted else {})}
    with LiveServer(f"sqlite:///{tmp_path / 'mhpo.db'}", env=env) as server:
        run_id = hooked_run(server, receiver.url)
        post_loss(server, run_id, [0.5, 2.0])
        [alert] = wait_for("the delivery to settle", lambda: settled(server, run_id))
    if trusted:
        assert alert["delivery_status"] == "delivered", alert
        assert len(receiver.bodies) == 1 and b"loss high" in receiver.bodies[0]
    else:
        assert alert["delivery_status"] == "failed", alert
        assert receiver.bodies == []


def test_a_bad_ca_bundle_is_refused_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        with pytest.raises(ValidationError, match="MHPO_WEBHOOK_CA_BUNDLE"):
            WebhookSettings(ca_bundle=str(path))
