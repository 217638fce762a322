"""
The verified identity of a peer, taken from its certificate after the TLS
handshake has checked the chain.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["PeerIdentity", "format_serial"]


def format_serial(serial: int) -> str:
    """
    Format a certificate serial number as ``openssl x509 -noout -serial`` does.

    The digits are uppercase hex of the integer's bytes, so a leading zero
    pads them to an even count: ``0BDC...``, never ``bdc...``. Searching for a
    serial that openssl, a CRL dump or a CA's records printed then finds it.
    """
    if serial < 0:
        # RFC 5280 forbids negative serials, but old CAs issued some.
        return "-" + format_serial(-serial)
    digits = f"{serial:X}"
    if len(digits) % 2:
        digits = "0" + digits
    return digits


@dataclass(frozen=True)
class PeerIdentity:
    """
    Who is on the other end of a connection: the subject's common name, the
    subjectAltNames of its certificate, the certificate's serial number and
    the peer's network address (``host:port``).

    It does not decide what the peer may do; the access policy decides
    that.
    """

    common_name: str
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    serial: int = 0
    address: str = ""

    @classmethod
    def from_certificate(
        cls, certificate: x509.Certificate, address: str = ""
    ) -> PeerIdentity:
        """Build the identity from a certificate that has already been verified."""
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else ""

        try:
            alt_names = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            return cls(common_name, serial=certificate.serial_number, address=address)

        ips = alt_names.get_values_for_type(x509.IPAddress)
        return cls(
            common_name=common_name,
            dns_names=tuple(alt_names.get_values_for_type(x509.DNSName)),
            uris=tuple(alt_names.get_values_for_type(x509.UniformResourceIdentifier)),
            ip_addresses=tuple(_address_text(ip) for ip in ips),
            serial=certificate.serial_number,
            address=address,
        )

    def names(self) -> tuple[str, ...]:
        """Return every name an access rule may match: the CN, then the SANs."""
        return (self.common_name, *self.dns_names, *self.uris)

    def as_dict(self) -> dict[str, object]:
        """Return the identity as JSON-serializable data, for ``whoami``-like methods."""
        return {
            "common_name": self.common_name,
            "dns_names": list(self.dns_names),
            "uris": list(self.uris),
            "ip_addresses": list(self.ip_addresses),
            "serial": format_serial(self.serial),
            "address": self.address,
        }


def _address_text(
    value: ipaddress.IPv4Address
    | ipaddress.IPv6Address
    | ipaddress.IPv4Network
    | ipaddress.IPv6Network,
) -> str:
    """
    Return one IP subjectAltName as text.

    cryptography reads a SAN entry of 8 or 32 bytes as a network; a
    subjectAltName names a single address (RFC 5280, section 4.2.1.6).
    """
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        raise ValueError(
            f"certificate IP subjectAltName {value!r} is a network;"
            " expected a single IPv4 or IPv6 address"
        )
    return str(value)
