"""What a local deployment needs for TLS and SuperNode authentication, made with the ``cryptography``
package (a dependency of Flower): a certificate authority and a server certificate for the
SuperLink's loopback address, and an EC key pair per SuperNode in the OpenSSH format Flower reads
(``flwr supernode register`` takes the public key, ``flower-supernode --auth-supernode-private-key``
the private one). For a deployment on several machines, use certificates of your own organisation
(docs/FLOWER.md)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's certificate: what SuperNodes and the flwr CLI trust (--root-certificates)
    cert: Path  # the SuperLink's certificate (--ssl-certfile)
    key: Path  # its private key (--ssl-keyfile)


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fellrec local deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                      days: int = 30) -> Certificates:
    """A fresh CA and a server certificate it signs for ``hosts`` (IP addresses or DNS names), PEM files
    in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fellrec local CA")).issuer_name(_name("fellrec local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    return Certificates(
        ca=_write(folder / "ca.crt", ca.public_bytes(pem)),
        cert=_write(folder / "server.pem", cert.public_bytes(pem)),
        key=_write(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()), private=True))


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """(private, public) key files of one SuperNode: EC P-384, OpenSSH format."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(folder / f"{name}.key", key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.OpenSSH,
                                                               serialization.NoEncryption()), private=True)
    public = _write(folder / f"{name}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                          serialization.PublicFormat.OpenSSH))
    return private, public
