"""The HSM jobs of a key transfer: new pending keys with their key_data, and proof checks.

``run_transfer`` and ``run_proof_checks`` are module-level jobs (``fn(settings, job)``) that run
in this process or on an HSM worker (``lifecycle.hsm.pool``); they take and return plain data,
never a key in clear. The claim (later) stores what they return and builds the HES orders.

New keys: for each meter, the current master key's blob is checked against its binding MAC
(``lifecycle.meter_keys.binding``) before it is unwrapped: a planted or moved master blob would
otherwise let its planter read the new keys off the key_data. The new keys are generated in the
HSM (``lifecycle.hsm.dlms_ops``), their blobs bound to meter, key id, new version and KEK by a
MAC made in the HSM, exactly like imported blobs, and the key_data of ``global_key_transfer`` is
built in ``TRANSFER_ORDER`` (GBEK, GAK, GUEK, master key last: ``lifecycle.dlms.key_transfer``).

Proof checks: the answer is parsed and checked without a key (``lifecycle.dlms.proof``), the
GUEK blob's binding is verified, then the HSM compares ciphertexts (``dlms_ops``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lifecycle.config import Settings
from lifecycle.dlms import key_transfer
from lifecycle.dlms.key_transfer import TRANSFER_ORDER, KeyEntry
from lifecycle.dlms.proof import GloCiphered, parse_answer
from lifecycle.errors import DlmsError, IntegrityError, ProofRefused
from lifecycle.hsm import dlms_ops
from lifecycle.hsm.check import verify_pins
from lifecycle.hsm.connection import Hsm
from lifecycle.hsm.dlms_ops import CiphertextCheck
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.session import HsmSession
from lifecycle.meter_keys.binding import BlobContext, message
from lifecycle.policy import SUITES, KeyId, storage_kek_role

_verified: set[tuple[KeyPin, ...]] = set()


@dataclass(frozen=True)
class MeterTransfer:
    """One meter to give new keys: who it is, its current master key (blob, MAC, version) and
    the version number the new keys get."""

    serial: str
    system_title: str  # hex, as the inventory holds it
    suite: int
    master_blob: bytes
    master_mac: bytes
    master_version: int
    new_version: int
    key_ids: tuple[KeyId, ...] = TRANSFER_ORDER


@dataclass(frozen=True)
class SealedKey:
    """A new key in custody: the pending version to store (blob, KEK, binding MAC)."""

    key_id: KeyId
    version: int
    blob: bytes
    kek_label: str
    mac: bytes


@dataclass(frozen=True)
class Transfer:
    """What a meter's key transfer needs: the pending keys to store and the order's key_data."""

    serial: str
    keys: tuple[SealedKey, ...]
    key_data: bytes


@dataclass(frozen=True)
class Refused:
    """A meter given no new keys, and why (its master key blob is not bound to it)."""

    serial: str
    reason: str


@dataclass(frozen=True)
class TransferJob:
    """New keys for a list of meters, in one HSM session; ``pins`` as in the import."""

    meters: Sequence[MeterTransfer]
    pins: tuple[KeyPin, ...] = ()


def run_transfer(settings: Settings, job: TransferJob) -> list[Transfer | Refused]:
    """Make new pending keys and key_data for each meter; a meter whose master blob fails its
    binding check is ``Refused`` and gets nothing.

    Raises:
        KeyPolicyError: a KEK or the MAC key is not the pinned one.
        TransientHsmError / PermanentHsmError: the HSM failed as a whole.
    """
    _verify_once(settings, job.pins)
    with Hsm.open(settings).session() as hs:
        bound = _masters_bound(hs, settings, job.meters)
        made = [_new_keys(hs, settings, meter) if ok else
                Refused(meter.serial, "master key blob is not bound to this meter (moved, "
                                      "swapped or planted)")
                for meter, ok in zip(job.meters, bound, strict=True)]
        return _sealed(hs, settings, job.meters, made)


def _verify_once(settings: Settings, pins: tuple[KeyPin, ...]) -> None:
    if pins and pins not in _verified:
        verify_pins(settings, pins)
        _verified.add(pins)


def _masters_bound(hs: HsmSession, settings: Settings,
                   meters: Sequence[MeterTransfer]) -> list[bool]:
    messages = [message(BlobContext(m.serial, m.system_title, KeyId.KEK, m.master_version,
                                    settings.master_kek_label), m.master_blob) for m in meters]
    return hs.verify_mac(settings.blob_mac_label, messages, [m.master_mac for m in meters])


def _new_keys(hs: HsmSession, settings: Settings,
              meter: MeterTransfer) -> list[dlms_ops.NewKey] | Refused:
    labels = [settings.kek_label(storage_kek_role(k)) for k in meter.key_ids]
    try:
        return dlms_ops.new_dlms_keys(hs, settings.master_kek_label, meter.master_blob, labels,
                                      [int(k) for k in meter.key_ids],
                                      SUITES[meter.suite].key_bits)
    except IntegrityError:
        return Refused(meter.serial, "master key blob does not unwrap")


def _sealed(hs: HsmSession, settings: Settings, meters: Sequence[MeterTransfer],
            made: Sequence[list[dlms_ops.NewKey] | Refused]) -> list[Transfer | Refused]:
    pending: list[tuple[MeterTransfer, KeyId, str, bytes]] = [
        (meter, KeyId(key.key_id), settings.kek_label(storage_kek_role(KeyId(key.key_id))),
         key.blob)
        for meter, keys in zip(meters, made, strict=True) if not isinstance(keys, Refused)
        for key in keys]
    macs = iter(hs.mac(settings.blob_mac_label, [
        message(BlobContext(m.serial, m.system_title, k, m.new_version, label), blob)
        for m, k, label, blob in pending]))
    out: list[Transfer | Refused] = []
    for meter, keys in zip(meters, made, strict=True):
        if isinstance(keys, Refused):
            out.append(keys)
            continue
        sealed = tuple(SealedKey(KeyId(k.key_id), meter.new_version, k.blob,
                                 settings.kek_label(storage_kek_role(KeyId(k.key_id))),
                                 next(macs)) for k in keys)
        key_data = key_transfer.encode([KeyEntry(KeyId(k.key_id), k.transfer_wrapped)
                                        for k in keys])
        out.append(Transfer(meter.serial, sealed, key_data))
    return out


@dataclass(frozen=True)
class ProofCheck:
    """A meter's answer to check against one stored GUEK version."""

    serial: str
    system_title: str  # hex
    suite: int
    guek_blob: bytes
    guek_mac: bytes
    guek_version: int
    challenge: bytes
    answer: bytes
    last_counter: int | None


@dataclass(frozen=True)
class ProofVerdict:
    """The outcome of a proof check: proven or not, the answer's counter, and why not."""

    serial: str
    proven: bool
    invocation_counter: int | None
    reason: str = ""
    bound: bool = True  # False: the GUEK blob's binding MAC failed (swapped or planted)


@dataclass(frozen=True)
class ProofJob:
    """Proof checks for a list of meters, in one HSM session."""

    checks: Sequence[ProofCheck]
    pins: tuple[KeyPin, ...] = ()


def run_proof_checks(settings: Settings, job: ProofJob) -> list[ProofVerdict]:
    """Check each answer: well-formed, from the meter, a fresh counter, a bound GUEK blob, and a
    ciphertext the GUEK makes from the challenge. A refused proof is a verdict, not an error.

    Raises:
        KeyPolicyError: the storage KEK or the MAC key is not the pinned one.
        TransientHsmError / PermanentHsmError: the HSM failed as a whole.
    """
    _verify_once(settings, job.pins)
    with Hsm.open(settings).session() as hs:
        return _checks(hs, settings, job.checks)


def check_proof(settings: Settings, check: ProofCheck) -> int:
    """Check one answer; return its invocation counter (to record for the key version).

    Raises:
        ProofRefused: the answer does not prove possession of the GUEK (or is malformed,
            replayed, from another meter, or the blob is not bound).
    """
    verdict = run_proof_checks(settings, ProofJob([check]))[0]
    if not verdict.proven or verdict.invocation_counter is None:
        raise ProofRefused(f"meter {check.serial}", verdict.reason)
    return verdict.invocation_counter


def _checks(hs: HsmSession, settings: Settings,
            checks: Sequence[ProofCheck]) -> list[ProofVerdict]:
    # Three passes, each one HSM call for the whole list (one call per answer cost more than
    # the HSM work): parse the answers, verify the GUEK blobs' bindings, compare ciphertexts.
    verdicts: list[ProofVerdict | None] = [None] * len(checks)
    parsed: list[tuple[int, ProofCheck, GloCiphered]] = []
    for i, check in enumerate(checks):
        try:
            parsed.append((i, check, parse_answer(check.answer, bytes.fromhex(check.system_title),
                                                  check.suite, check.challenge,
                                                  check.last_counter)))
        except DlmsError as exc:
            verdicts[i] = ProofVerdict(check.serial, False, None, str(exc))
    label = settings.storage_kek_label
    bound = hs.verify_mac(settings.blob_mac_label, [
        message(BlobContext(c.serial, c.system_title, KeyId.GUEK, c.guek_version, label),
                c.guek_blob) for _, c, _ in parsed], [c.guek_mac for _, c, _ in parsed])
    compare = []
    for (i, check, answer), ok in zip(parsed, bound, strict=True):
        if ok:
            compare.append((i, check, answer))
        else:
            verdicts[i] = ProofVerdict(check.serial, False, answer.invocation_counter,
                                       f"GUEK version {check.guek_version} blob is not bound "
                                       "to the meter", bound=False)
    matches = dlms_ops.gcm_ciphertexts_match(hs, label, [
        CiphertextCheck(c.guek_blob, a.iv, c.challenge, a.ciphertext) for _, c, a in compare])
    for (i, check, answer), match in zip(compare, matches, strict=True):
        verdicts[i] = ProofVerdict(check.serial, True, answer.invocation_counter) if match else \
            ProofVerdict(check.serial, False, answer.invocation_counter,
                         f"answer is not the challenge under GUEK version {check.guek_version}")
    return [v for v in verdicts if v is not None]
