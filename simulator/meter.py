"""A simulated meter: the keys it holds, the key transfer it accepts, and the proofs it answers.

It plays the meter's side of DLMS Security Setup (class id 64) method 2 ``global_key_transfer``
(DLMS Green Book, IEC 62056-5-3 / Blue Book IEC 62056-6-2): ``key_data`` is an A-XDR array of
structures {key_id: enum, key_wrapped: octet-string}, each key wrapped with the meter's current
master key by AES key wrap (RFC 3394). key_data is parsed with gurux-dlms (the reference
implementation), then checked strictly; keys are unwrapped with ``cryptography`` (gurux 1.0.203's
``GXDLMSSecureClient.decrypt`` fails on every input and takes 128-bit KEKs only).

A proof of possession is a general-glo-ciphering APDU (tag 0xDB) whose plaintext is the
challenge, ciphered with AAD = SC || AK under the meter's GUEK, its invocation counter rising per
message. It is built with gurux's ciphering (``GXDLMSChippering.encryptAesGcm``), or with
``cryptography``'s AES-GCM on the fast path; a test checks that both give the same bytes.

Modes say how the meter behaves on a key order: ``ok``; ``fail`` (rejects, keeps its keys,
answers failed); ``silent`` (never answers; the order did not reach it); ``lie_nak`` (applies the
keys, answers not_ok); ``lie_ok`` (keeps its keys, answers ok with a proof under the old GUEK);
``partial:k`` (installs the first k keys of key_data, then fails). A recovery challenge
(``prove``) is always answered honestly, with the keys the meter holds.

Certificates (suite 1 and 2): the meter makes a key pair per use and a PKCS#10 request for it
(Security Setup methods 4 ``generate_key_pair`` and 5 ``generate_certificate_request``), and
imports a certificate (method 6 ``import_certificate``) only if it certifies one of its own
keys. ``csr_flaw`` makes its requests wrong on purpose (``wrong_subject``, ``wrong_curve``), to
see them refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap
from cryptography.x509.oid import NameOID
from gurux_dlms.AesGcmParameter import AesGcmParameter
from gurux_dlms.enums.Security import Security
from gurux_dlms.GXArray import GXArray
from gurux_dlms.GXByteBuffer import GXByteBuffer
from gurux_dlms.GXDLMSChippering import GXDLMSChippering
from gurux_dlms.GXEnum import GXEnum
from gurux_dlms.GXStructure import GXStructure
from gurux_dlms.internal._GXCommon import _GXCommon
from gurux_dlms.internal._GXDataInfo import _GXDataInfo

from lifecycle.dlms import apdu
from lifecycle.dlms.apdu import GloCiphered, SecurityControl
from lifecycle.policy import SUITES, KeyId

MODES = ("ok", "fail", "silent", "lie_nak", "lie_ok")
_PARTIAL = re.compile(r"partial:([0-9])")
CURVES = {1: ec.SECP256R1, 2: ec.SECP384R1}
USAGES = {"signature": "digital_signature", "key_agreement": "key_agreement"}
CSR_FLAWS = ("", "wrong_subject", "wrong_curve")


class KeyTransferRejected(Exception):
    """The meter refuses a key transfer; it keeps every key it had."""

    def __init__(self, serial: str, reason: str) -> None:
        self.serial = serial
        self.reason = reason
        super().__init__(f"meter {serial}: key transfer rejected: {reason}")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known one.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in MODES and not _PARTIAL.fullmatch(mode):
        raise ValueError(f"unknown meter mode {mode!r}: one of {', '.join(MODES)}, partial:k")
    return mode


@dataclass(frozen=True)
class Answer:
    """What a meter answers a key order: a status and, for ``ok``, its proof APDU."""

    status: str
    proof: bytes | None = None


@dataclass
class SimulatedMeter:
    """A meter with its current keys (plaintext: only the meter and the HSM see these)."""

    serial: str
    system_title: bytes
    suite: int
    keys: dict[KeyId, bytes] = field(repr=False)
    transfers: int = 0
    mode: str = "ok"
    invocation_counter: int = 0  # of the current GUEK: starts again at 0 with a new GUEK
    engine: str = "gurux"  # or "cryptography": the fast path, same bytes
    ec_keys: dict[str, str] = field(default_factory=dict, repr=False)  # usage -> PKCS#8 PEM
    certificates: dict[str, str] = field(default_factory=dict)  # usage -> certificate DER, hex
    csr_flaw: str = ""

    @classmethod
    def from_secrets(cls, record: Mapping[str, Any], mode: str = "ok") -> SimulatedMeter:
        """Build a meter from one record of ``read_meter_secrets``."""
        return cls(serial=str(record["serial"]),
                   system_title=bytes.fromhex(str(record["system_title"])),
                   suite=int(record["suite"]),
                   keys={k: bytes.fromhex(str(record[k.field])) for k in KeyId},
                   mode=check_mode(mode))

    # --- state ---------------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        """Return the meter as JSON-ready data (the simulator's own file: keys in clear)."""
        return {"serial": self.serial, "system_title": self.system_title.hex().upper(),
                "suite": self.suite, "keys": {k.field: v.hex() for k, v in self.keys.items()},
                "transfers": self.transfers, "mode": self.mode,
                "invocation_counter": self.invocation_counter, "engine": self.engine,
                "ec_keys": dict(self.ec_keys), "certificates": dict(self.certificates),
                "csr_flaw": self.csr_flaw}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SimulatedMeter:
        """Rebuild a meter from ``to_state``."""
        return cls(serial=state["serial"], system_title=bytes.fromhex(state["system_title"]),
                   suite=int(state["suite"]),
                   keys={KeyId[name.upper()]: bytes.fromhex(v)
                         for name, v in state["keys"].items()},
                   transfers=int(state["transfers"]), mode=check_mode(state["mode"]),
                   invocation_counter=int(state["invocation_counter"]),
                   engine=state.get("engine", "gurux"), ec_keys=dict(state.get("ec_keys", {})),
                   certificates=dict(state.get("certificates", {})),
                   csr_flaw=str(state.get("csr_flaw", "")))

    def key(self, key_id: KeyId) -> bytes:
        """Return a key the meter holds."""
        return self.keys[key_id]

    # --- key transfer --------------------------------------------------------------------------
    def apply_key_transfer(self, key_data: bytes, stop_after: int | None = None) -> list[KeyId]:
        """Unwrap and install the keys of a ``global_key_transfer`` in array order; return the
        ids installed.

        All keys are unwrapped with the master key held *before* the call (also when the
        transfer replaces the master key itself) and checked before the first is installed.
        ``stop_after`` k installs only the first k (a power loss after k keys).

        Raises:
            KeyTransferRejected: malformed key_data, unknown or repeated key id, wrong key
                length for the suite, or a failed RFC 3394 integrity check.
        """
        kek = self.keys[KeyId.KEK]
        size = SUITES[self.suite].key_bits // 8
        new: list[tuple[KeyId, bytes]] = []
        for key_id, wrapped in self._decode(key_data):
            if key_id in dict(new):
                raise KeyTransferRejected(self.serial, f"key id {key_id.name} appears twice")
            try:
                key = aes_key_unwrap(kek, wrapped)
            except (InvalidUnwrap, ValueError):
                # RFC 3394 §2.2.3: the initial value check failed (wrong KEK or tampering).
                raise KeyTransferRejected(self.serial,
                                          f"{key_id.name} fails the key wrap check") from None
            if len(key) != size:
                raise KeyTransferRejected(self.serial, f"{key_id.name} is {len(key) * 8} bits, "
                                                       f"suite {self.suite} needs {size * 8}")
            new.append((key_id, key))
        installed = new if stop_after is None else new[:stop_after]
        for key_id, key in installed:  # one by one, in array order
            self.keys[key_id] = key
            if key_id == KeyId.GUEK:
                self.invocation_counter = 0
        self.transfers += 1
        return [key_id for key_id, _ in installed]

    def _decode(self, data: bytes) -> list[tuple[KeyId, bytes]]:
        """Parse key_data with gurux, then hold it to the exact A-XDR shape."""
        buffer, info = GXByteBuffer(bytes(data)), _GXDataInfo()
        try:
            value = _GXCommon.getData(None, buffer, info)
        except Exception as exc:  # noqa: BLE001 - gurux raises anything on bad input
            raise KeyTransferRejected(self.serial, f"key_data does not parse ({exc})") from None
        if not info.complete or not isinstance(value, GXArray):
            raise KeyTransferRejected(self.serial, "key_data is truncated or not an array")
        if buffer.position != buffer.size:
            raise KeyTransferRejected(self.serial, "trailing bytes after key_data")
        entries = [self._entry(item) for item in value]
        if not entries:
            raise KeyTransferRejected(self.serial, "key_data holds no key")
        return entries

    def _entry(self, item: Any) -> tuple[KeyId, bytes]:
        if not isinstance(item, GXStructure) or len(item) != 2:
            raise KeyTransferRejected(self.serial, "key_data structure is not of 2 elements")
        raw_id, wrapped = item
        if not isinstance(raw_id, GXEnum) or not isinstance(wrapped, bytearray):
            raise KeyTransferRejected(self.serial, "key_data element is not {enum, octet-string}")
        if int(raw_id) not in KeyId._value2member_map_:
            raise KeyTransferRejected(self.serial, f"unknown key id {int(raw_id)}")
        return KeyId(int(raw_id)), bytes(wrapped)

    # --- orders and proofs ---------------------------------------------------------------------
    def handle_order(self, system_title: bytes, key_data: bytes, challenge: bytes
                     ) -> Answer | None:
        """Run a key order as the meter's mode says; ``None`` is no answer at all."""
        if self.mode == "silent":
            return None
        if system_title != self.system_title or self.mode == "fail":
            return Answer("failed")
        if self.mode == "lie_ok":
            return Answer("ok", self.prove(challenge))
        partial = _PARTIAL.fullmatch(self.mode)
        try:
            self.apply_key_transfer(key_data, int(partial.group(1)) if partial else None)
        except KeyTransferRejected:
            return Answer("failed")
        if partial:
            return Answer("failed")
        if self.mode == "lie_nak":
            return Answer("not_ok")
        return Answer("ok", self.prove(challenge))

    def prove(self, challenge: bytes) -> bytes:
        """Answer a challenge: a general-glo-ciphering APDU of it under the current GUEK and AK,
        with the next invocation counter."""
        self.invocation_counter += 1
        if self.engine == "cryptography":
            return self._cipher_fast(challenge)
        return self._cipher_gurux(challenge)

    def _cipher_gurux(self, plaintext: bytes) -> bytes:
        p = AesGcmParameter(apdu.GENERAL_GLO_CIPHERING, self.system_title,
                            self.keys[KeyId.GUEK], self.keys[KeyId.GAK])
        p.security = Security.AUTHENTICATION_ENCRYPTION
        p.securitySuite = self.suite
        p.invocationCounter = self.invocation_counter
        return bytes(GXDLMSChippering.encryptAesGcm(p, plaintext))

    def _cipher_fast(self, plaintext: bytes) -> bytes:
        sc = SecurityControl(self.suite).to_byte()
        iv = apdu.gcm_iv(self.system_title, self.invocation_counter)
        out = AESGCM(self.keys[KeyId.GUEK]).encrypt(iv, plaintext,
                                                     bytes([sc]) + self.keys[KeyId.GAK])
        return apdu.encode(GloCiphered(self.system_title, sc, self.invocation_counter,
                                       out[:len(plaintext)], out[len(plaintext):][:12]))

    # --- certificates --------------------------------------------------------------------------
    def csr(self, usage: str) -> bytes:
        """Return a PEM CSR for an operational certificate (suite 1/2 meters only).

        ``usage`` is ``signature`` or ``key_agreement``; each has its own key pair on the suite's
        curve, made on first use. Subject CN = system title (hex).

        Raises:
            ValueError: a suite 0 meter, or an unknown usage.
        """
        if self.suite not in CURVES or usage not in USAGES:
            raise ValueError(f"meter {self.serial} (suite {self.suite}) makes no {usage} CSR")
        return self.certificate_request(usage, serialization.Encoding.PEM)

    def certificate_request(self, usage: str,
                            encoding: serialization.Encoding = serialization.Encoding.DER
                            ) -> bytes:
        """Return a PKCS#10 request (DER unless told) for the key pair of ``usage``, made on
        first use (Security Setup methods 4 and 5), flawed as ``csr_flaw`` says.

        Raises:
            ValueError: a suite 0 meter, or an unknown usage.
        """
        if self.suite not in CURVES or usage not in USAGES:
            raise ValueError(f"meter {self.serial} (suite {self.suite}) makes no {usage} CSR")
        key: ec.EllipticCurvePrivateKey = self._ec_key(usage)
        if self.csr_flaw == "wrong_curve":
            key = ec.generate_private_key(ec.SECP384R1() if self.suite == 1 else ec.SECP256R1())
        digest = hashes.SHA384() if self.suite == 2 else hashes.SHA256()
        flags = {name: name == USAGES[usage] for name in (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")}
        title = self.system_title.hex().upper()
        if self.csr_flaw == "wrong_subject":
            title = title[::-1]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, title)])
        request = (x509.CertificateSigningRequestBuilder().subject_name(subject)
                   .add_extension(x509.KeyUsage(**flags), critical=True).sign(key, digest))
        return request.public_bytes(encoding)

    def import_certificate(self, der: bytes) -> str:
        """Store a certificate for one of the meter's own key pairs; return its usage.

        Raises:
            ValueError: not a certificate, or it certifies none of the meter's keys.
        """
        cert = x509.load_der_x509_certificate(der)
        public = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        for usage in self.ec_keys:
            mine = self._ec_key(usage).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if mine == public:
                self.certificates[usage] = der.hex()
                return usage
        raise ValueError(f"meter {self.serial}: the certificate is for none of its keys")

    def _ec_key(self, usage: str) -> ec.EllipticCurvePrivateKey:
        pem = self.ec_keys.get(usage)
        if pem is None:
            key = ec.generate_private_key(CURVES[self.suite]())
            self.ec_keys[usage] = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()).decode()
            return key
        loaded = serialization.load_pem_private_key(pem.encode(), None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        return loaded
