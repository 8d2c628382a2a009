"""Certificates and keys for a deployment, made with the `cryptography` package.

One directory holds everything (`fedssl certs --out DIR`):

    ca.crt, ca.key            the CA that signs the server certificate; sites get ca.crt
    server.crt, server.key    the SuperLink's TLS certificate (SANs: the given hosts/IPs)
    sites/NAME.key, .pub      one SuperNode authentication key pair per site: EC P-384,
                              OpenSSH format, as flower-supernode --auth-supernode-private-key
                              and `flwr supernode register` read them

Private keys are written with mode 0600; nothing is overwritten without `force`.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1  # a NIST curve: Flower's node auth accepts only those
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CertError(ValueError):
    """One-line, user-facing."""


@dataclass
class Written:
    files: list[Path] = field(default_factory=list)

    def add(self, path: Path, data: bytes, private: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)  # umask cannot loosen or tighten it
        os.replace(tmp, path)
        self.files.append(path)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedssl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
                raise CertError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("fedssl CA")).issuer_name(_name("fedssl CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def site_key_pair() -> tuple[bytes, bytes]:
    """(private, public) in OpenSSH format, the format Flower's SuperNode auth reads."""
    key = _key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def planned_files(out: Path, hosts: list[str], sites: list[str], keys_only: bool) -> list[Path]:
    files = [] if keys_only else [out / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    for site in sites:
        files += [out / "sites" / f"{site}.key", out / "sites" / f"{site}.pub"]
    return files


def make_certs(out: str | Path, hosts: list[str], sites: list[str], *, force: bool = False,
               keys_only: bool = False, days: int = 825) -> list[Path]:
    """Write the CA, the server certificate and the site key pairs; return the files written.
    `keys_only` adds site key pairs to an existing directory (a new site)."""
    out = Path(out).expanduser().resolve()
    for site in sites:
        if not SITE_NAME.match(site):
            raise CertError(f"--site {site!r}: use letters, digits, '.', '_' or '-' (max 63)")
    if len(set(sites)) != len(sites):
        raise CertError(f"--site names repeat: {sites}")
    if keys_only and not sites:
        raise CertError("--keys-only needs at least one --site")
    if not keys_only:
        if not hosts:
            raise CertError("the server certificate needs at least one --host (the name or IP "
                            "the sites and the operator use to reach the server)")
        _san(hosts)  # validate before writing anything
    existing = [p for p in planned_files(out, hosts, sites, keys_only) if p.exists()]
    if existing and not force:
        raise CertError("refusing to overwrite " + ", ".join(map(str, existing)) +
                        " (use --force to replace them)")
    written = Written()
    out.mkdir(parents=True, exist_ok=True)
    if not keys_only:
        ca_key, ca_cert = make_ca(days)
        server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, days)
        pem = serialization.Encoding.PEM
        written.add(out / "ca.crt", ca_cert.public_bytes(pem), private=False)
        written.add(out / "ca.key", _pem_key(ca_key), private=True)
        written.add(out / "server.crt", server_cert.public_bytes(pem), private=False)
        written.add(out / "server.key", _pem_key(server_key), private=True)
    for site in sites:
        private, public = site_key_pair()
        written.add(out / "sites" / f"{site}.key", private, private=True)
        written.add(out / "sites" / f"{site}.pub", public, private=False)
    return written.files


def next_steps(out: Path, hosts: list[str], sites: list[str], keys_only: bool) -> str:
    out = Path(out).expanduser().resolve()
    host = hosts[0] if hosts else "SERVER"
    lines = ["next:"]
    if not keys_only:
        lines += ["  # on the server (keep ca.key offline; server.key stays on the server)",
                  f"  fedssl server --certs {out} --workdir /srv/fedssl",
                  "  # on the operator machine: a connection named 'fedssl' in $FLWR_HOME/config.toml",
                  f"  fedssl connect fedssl --address {host}:8000 --ca {out}/ca.crt"]
    lines.append("  # register each site's public key (SuperLink running, from the operator machine)")
    lines += [f"  flwr supernode register {out}/sites/{s}.pub fedssl --name {s}" for s in sites]
    lines.append("  # copy ca.crt and the site's .key to each site, then there:")
    lines += [f"  fedssl client --superlink {host}:8000 --ca ca.crt --key {s}.key "
              f"--data-path /data/images" for s in sites[:2]]
    return "\n".join(lines)
