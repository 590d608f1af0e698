"""Backup and restore of the embedded SoftHSM2 token: signed manifests, checked restores.

Backup and restore hold the token lock exclusively (``lifecycle.hsm.token_lock``), so they never
copy or replace a token that a process may be writing. Backups never contain PIN files.

A backup holds the main token (``token_label``) only. The token folder of the embedded default
also holds the offline root CA's token (``root_token_label``, made by the PKI ceremony) and may
hold others: they are left out, since the offline root must not travel with the online
backups (its ceremony operators keep its own offline copy), and a restore carries them over
untouched. A token's folder is recognised by the label SoftHSM2 keeps in its ``token.object``
(``token_label_of``).

Why a signature: SoftHSM2 stores the boolean attributes of private objects unencrypted in the
token's object files (``SENSITIVE``, ``EXTRACTABLE``...), so anyone who can write a backup can
make its KEK extractable and re-hash a plain checksum manifest. A backup's manifest is therefore
signed in the HSM with the audit signing key, which an attacker without the token cannot use,
over a domain-separated digest (``manifest_digest``): it covers every file with its SHA-256, the
generation, the token and key labels, and each long-lived key's role, label, CKA_ID and check
value (the inventory's pins). The audit key is reused rather than a backup key added: it is
pinned already, its public key is what verifiers hold, and each use signs a digest with its own
purpose: ``meterkeys-token-backup/1`` here, ``meterkeys-audit-checkpoint/1`` inside the JSON of
an audit checkpoint (``lifecycle.audit.chain.checkpoint_digest``), so neither can pass as the
other.

A restore checks, before anything is replaced: the signature under the audit key whose
SubjectPublicKeyInfo digest the inventory pinned; the object set (every listed file present with
its digest, nothing else); then, in a *spawned* child on a staged copy (this process may already
have the module loaded with the current token; reference pkcs11.md §3), every pinned key's
CKA_ID, attributes and check value (``check.verify_pins``) and a known-answer unwrap of the
caller's canary and sample blobs, destroying each session key at once. Only then is the staged
directory swapped in, and the replaced token directory is deleted. Which generation may be
restored is the caller's decision (``lifecycle.installation.rules``): this package knows nothing
of the database.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from lifecycle.clock import utcnow
from lifecycle.config import Settings
from lifecycle.errors import BackupError, ConfigError, HsmError, MeterkeysError
from lifecycle.hsm import check
from lifecycle.hsm.connection import Hsm, close_all
from lifecycle.hsm.keyring import KeyPin
from lifecycle.hsm.provision import softhsm_conf_text, write_private, write_softhsm_conf
from lifecycle.hsm.token_lock import LOCK_NAME, hold_token_lock

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
MANIFEST_MAX_BYTES = 1 << 20
# Domain separation of the signed digest (see the module docstring); bump with the format.
SIGNATURE_DOMAIN = b"meterkeys-token-backup/1\0"
SIGNATURE_ALG = "ECDSA-P256-SHA256"
CONF_NAME = "softhsm2.conf"
TOKENS_NAME = "tokens"
CHECK_TIMEOUT_SECONDS = 120.0
# SoftHSM2's token.object stores the token label as attribute CKA_OS_TOKENLABEL (0x80005349,
# SoftHSM2 OSAttributes.h), kind 3 (byte string), 32 octets padded with spaces: 8 octets each,
# big-endian, as every attribute of its object files.
_TOKEN_LABEL_ENTRY = ((0x80005349).to_bytes(8, "big") + (3).to_bytes(8, "big")
                      + (32).to_bytes(8, "big"))
TOKEN_OBJECT = "token.object"  # noqa: S105 - a file name, not a secret
_LABEL_FIELDS = ("token_label", "storage_kek_label", "master_kek_label", "blob_mac_label",
                 "audit_key_label")


# --- the manifest -------------------------------------------------------------------------------
def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """Return the canonical bytes of a manifest without its signature (sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def manifest_digest(manifest: dict[str, Any]) -> bytes:
    """Return the SHA-256 digest the audit key signs: domain prefix + canonical manifest."""
    return hashlib.sha256(SIGNATURE_DOMAIN + canonical_manifest(manifest)).digest()


def spki_sha256(public_pem: str) -> str:
    """Return the hex SHA-256 of a PEM public key's SubjectPublicKeyInfo (the pinned value).

    Raises:
        ValueError: not a PEM public key.
    """
    public = serialization.load_pem_public_key(public_pem.encode("ascii"))
    return hashlib.sha256(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@dataclass(frozen=True)
class BackupResult:
    """A backup made: where it is, its generation and the SHA-256 of its manifest file."""

    path: Path
    generation: int
    manifest_sha256: str


@dataclass(frozen=True)
class VerifiedBackup:
    """A backup whose signature, labels and files were checked (``verify_backup``)."""

    path: Path
    manifest: dict[str, Any]
    generation: int
    manifest_sha256: str
    pins: tuple[KeyPin, ...]


# --- backup ---------------------------------------------------------------------------------------
def backup(settings: Settings, *, canary: bytes, generation: int, pins: Sequence[KeyPin],
           audit_check_value: str, dest: Path, timeout: float = 10.0,
           now: datetime | None = None) -> BackupResult:
    """Copy the token directory and its configuration into ``dest/<UTC timestamp>/``, signed.

    The copy is taken under the exclusive token lock; the manifest (file digests, generation,
    labels, ``pins``, the digest of the storage KEK's ``canary``) is then signed with the audit
    key in a spawned child, and the signing key is checked against ``audit_check_value`` (the
    pinned SHA-256 of its SubjectPublicKeyInfo). PIN files are never copied.

    Raises:
        ConfigError: not an embedded SoftHSM2 token, or no token directory.
        TokenBusy: a process holds the token open.
        BackupError: the token's audit key is not the pinned one, or signing failed.
    """
    token_dir = _softhsm_token_dir(settings)
    stamp = _stamp(now)
    dest = dest.expanduser().resolve()
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    final = dest / stamp
    partial = dest / f".{stamp}.partial"
    with hold_token_lock(settings, exclusive=True, timeout=timeout):
        partial.mkdir(mode=0o700)
        try:
            files = _copy_tree(token_dir, partial / TOKENS_NAME, settings)
            if settings.softhsm_conf_path.exists():
                files[CONF_NAME] = _copy_file(settings.softhsm_conf_path, partial / CONF_NAME)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    try:
        manifest = _manifest(settings, stamp, generation, pins, canary, files)
        _sign(settings, manifest, audit_check_value, partial)
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        write_private(partial / MANIFEST_NAME, data)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(final)
    return BackupResult(final, generation, hashlib.sha256(data).hexdigest())


def _manifest(settings: Settings, stamp: str, generation: int, pins: Sequence[KeyPin],
              canary: bytes, files: dict[str, str]) -> dict[str, Any]:
    labels = {field: getattr(settings, field) for field in _LABEL_FIELDS}
    return {
        "format": MANIFEST_FORMAT,
        "generation": generation,
        "created_at": stamp,
        **labels,
        "keys": [asdict(pin) for pin in sorted(pins, key=lambda p: p.role)],
        "kek_check_sha256": hashlib.sha256(canary).hexdigest(),
        "files": dict(sorted(files.items())),
    }


@dataclass(frozen=True)
class _SignRequest:
    """What the signing child needs: the settings' fields (never a PIN) and the manifest."""

    fields: dict[str, Any]
    manifest: dict[str, Any]


def _sign(settings: Settings, manifest: dict[str, Any], audit_check_value: str,
          where: Path) -> None:
    """Sign ``manifest`` in place (adds ``audit_public_key`` and ``signature``).

    Raises:
        BackupError: the token's audit key is not the pinned one, or the signature is bad.
    """
    request = _SignRequest(settings.model_dump(exclude={"pin", "so_pin"}), manifest)
    signature, public_pem = _in_child(_sign_in_child, request, where, "signing")
    if spki_sha256(public_pem) != audit_check_value:
        raise BackupError(where, f"the token's audit key {settings.audit_key_label!r} is not "
                                 "the one pinned in the inventory: refusing to sign a backup "
                                 "with it")
    manifest["audit_public_key"] = public_pem
    manifest["signature"] = {"alg": SIGNATURE_ALG, "domain": SIGNATURE_DOMAIN[:-1].decode(),
                             "value": base64.b64encode(signature).decode("ascii")}
    _check_signature(where, manifest, audit_check_value)


def _sign_in_child(request: _SignRequest) -> tuple[bytes, str]:
    """Child side: sign the manifest and its audit public key; return (DER signature, PEM).

    The live token's audit key signs; its public half goes into the signed body, so a restore
    checks the signature under the very key whose digest the inventory pins.
    """
    try:
        s = Settings(**request.fields)
        with Hsm.open(s).session() as session:
            public_pem = session.public_key_pem(s.audit_key_label).decode("ascii")
            digest = manifest_digest({**request.manifest, "audit_public_key": public_pem})
            return session.sign_ecdsa(s.audit_key_label, digest), public_pem
    finally:
        close_all()


def _softhsm_token_dir(settings: Settings) -> Path:
    if not settings.is_softhsm:
        raise ConfigError("backup and restore cover the embedded SoftHSM2 token only; "
                          "back up a network HSM with its vendor's procedure")
    token_dir = settings.token_dir
    if not token_dir.is_dir():
        raise ConfigError(f"no token directory {token_dir}: run meterkeys hsm init")
    return token_dir


def _stamp(now: datetime | None) -> str:
    return (now or utcnow()).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def token_label_of(folder: Path) -> str | None:
    """Return the label of the SoftHSM2 token in ``folder`` (None: no ``token.object``).

    Raises:
        BackupError: a ``token.object`` whose label cannot be read.
    """
    path = folder / TOKEN_OBJECT
    if not path.is_file():
        return None
    data = path.read_bytes()
    at = data.find(_TOKEN_LABEL_ENTRY)
    if at < 0 or len(data) < at + len(_TOKEN_LABEL_ENTRY) + 32:
        raise BackupError(path, "no token label in it: not a SoftHSM2 token this backup knows")
    start = at + len(_TOKEN_LABEL_ENTRY)
    return data[start:start + 32].decode("utf-8", "replace").rstrip(" ")


def other_tokens(token_dir: Path, label: str) -> list[Path]:
    """Return the token folders in ``token_dir`` that are not the token ``label``'s.

    Raises:
        BackupError: a token whose label cannot be read.
    """
    return [folder for folder in sorted(token_dir.iterdir()) if folder.is_dir()
            and not folder.is_symlink() and token_label_of(folder) not in (None, label)]


def _copy_tree(src: Path, dst: Path, settings: Settings) -> dict[str, str]:
    """Copy the main token of a token directory; return {relative path: sha256} of what was
    copied (other tokens, the root's among them, are left out)."""
    secrets = settings.secrets_dir.resolve()
    others = other_tokens(src, settings.token_label)
    files: dict[str, str] = {}
    dst.mkdir(mode=0o700)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.name == LOCK_NAME or _is_pin_file(path, secrets) or \
                any(path == o or path.is_relative_to(o) for o in others):
            continue
        if path.is_symlink():
            raise BackupError(path, "symbolic link in the token directory; refusing to follow it")
        if path.is_dir():
            (dst / rel).mkdir(mode=0o700)
        else:
            files[f"{TOKENS_NAME}/{rel.as_posix()}"] = _copy_file(path, dst / rel)
    return files


def _is_pin_file(path: Path, secrets: Path) -> bool:
    return path.suffix == ".pin" or path.resolve().is_relative_to(secrets)


def _copy_file(src: Path, dst: Path) -> str:
    data = src.read_bytes()
    write_private(dst, data)
    return hashlib.sha256(data).hexdigest()


# --- verification ---------------------------------------------------------------------------------
def verify_backup(settings: Settings, src: Path, audit_check_value: str) -> VerifiedBackup:
    """Check a backup's manifest signature, labels and object set; return what it holds.

    ``audit_check_value`` is the inventory's pin of the audit key (SHA-256 of its
    SubjectPublicKeyInfo): the manifest must be signed by that key and no other.

    Raises:
        BackupError: no or unreadable manifest, unknown format, bad or foreign signature,
            labels of another installation, or a file missing, altered or not listed.
        ConfigError: not an embedded SoftHSM2 token.
    """
    if not settings.is_softhsm:
        raise ConfigError("restore covers the embedded SoftHSM2 token only")
    src = src.expanduser().resolve()
    path = src / MANIFEST_NAME
    raw = _read_manifest(path)
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BackupError(path, f"unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BackupError(path, "unknown manifest format (not a signed meterkeys token backup)")
    _check_signature(path, manifest, audit_check_value)
    for field in _LABEL_FIELDS:
        if manifest.get(field) != getattr(settings, field):
            raise BackupError(path, f"{field} is {manifest.get(field)!r}, this installation "
                                    f"uses {getattr(settings, field)!r}")
    generation = manifest.get("generation")
    if type(generation) is not int or generation < 1:
        raise BackupError(path, "generation is not a positive integer")
    files = manifest.get("files")
    if not isinstance(files, dict) or not any(k.startswith(f"{TOKENS_NAME}/") for k in files):
        raise BackupError(path, "manifest lists no token files")
    _check_files(src, files)
    return VerifiedBackup(src, manifest, generation, hashlib.sha256(raw).hexdigest(),
                          _pins_of(path, manifest))


def _read_manifest(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MANIFEST_MAX_BYTES + 1)
    except FileNotFoundError:
        raise BackupError(path, "no manifest: not a meterkeys token backup") from None
    except OSError as exc:
        raise BackupError(path, f"unreadable manifest ({exc.strerror})") from None
    if len(raw) > MANIFEST_MAX_BYTES:
        raise BackupError(path, f"manifest larger than {MANIFEST_MAX_BYTES} bytes")
    return raw


def _check_signature(path: Path, manifest: dict[str, Any], audit_check_value: str) -> None:
    signature, public_pem = manifest.get("signature"), manifest.get("audit_public_key")
    if not isinstance(signature, dict) or not isinstance(public_pem, str):
        raise BackupError(path, "manifest is not signed: refused")
    if signature.get("alg") != SIGNATURE_ALG:
        raise BackupError(path, f"signature algorithm {signature.get('alg')!r} is not "
                                f"{SIGNATURE_ALG}")
    try:
        public = serialization.load_pem_public_key(public_pem.encode("ascii"))
        value = base64.b64decode(str(signature.get("value")), validate=True)
    except (ValueError, UnicodeError):
        raise BackupError(path, "malformed signature or audit public key") from None
    if spki_sha256(public_pem) != audit_check_value:
        raise BackupError(path, "signed by a key other than the audit key pinned in this "
                                "inventory: refused")
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise BackupError(path, "the signing key is not an EC key")
    try:
        digest = manifest_digest({k: v for k, v in manifest.items() if k != "signature"})
        public.verify(value, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, TypeError, ValueError):
        raise BackupError(path, "manifest signature does not verify: the backup was altered "
                                "after it was made; refused") from None


def _pins_of(path: Path, manifest: dict[str, Any]) -> tuple[KeyPin, ...]:
    keys = manifest.get("keys")
    try:
        assert isinstance(keys, list)
        return tuple(KeyPin(role=str(k["role"]), label=str(k["label"]),
                            key_id=str(k["key_id"]), check_value=str(k["check_value"]))
                     for k in keys)
    except (AssertionError, KeyError, TypeError):
        raise BackupError(path, "manifest's key list is malformed") from None


def _check_files(src: Path, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        path = (src / rel).resolve()
        if not path.is_relative_to(src) or not path.is_file():
            raise BackupError(src / rel, "file listed in the manifest is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BackupError(path, "SHA-256 differs from the manifest: backup is corrupted")
    present = {p.relative_to(src).as_posix() for p in (src / TOKENS_NAME).rglob("*")
               if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(files))
    if extra:
        raise BackupError(src / extra[0], "file not listed in the manifest")


# --- restore --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestoreReport:
    """What a restore did: the generation, blobs and keys checked, the removed previous token."""

    token_dir: Path
    generation: int
    removed: Path | None
    checked_blobs: int
    checked_keys: int


@dataclass(frozen=True)
class _CheckRequest:
    """What the child needs to open the staged token: paths, labels, pins and wrapped blobs."""

    fields: dict[str, Any]
    pins: tuple[KeyPin, ...]
    blobs: tuple[tuple[str, bytes], ...]


def restore(settings: Settings, verified: VerifiedBackup, *, pins: Sequence[KeyPin],
            blobs: Sequence[tuple[str, bytes]], timeout: float = 10.0,
            now: datetime | None = None) -> RestoreReport:
    """Stage a verified backup, prove it in a child, swap it in and delete the replaced token.

    ``pins`` are the keys the staged token must hold exactly (CKA_ID, attributes, check
    value); ``blobs`` are (KEK label, blob) pairs, the storage KEK's canary first, each of which
    must unwrap. Every file is re-hashed as it is staged. If anything fails, the current token
    is left untouched; after a successful swap the previous token directory is deleted, since
    it may hold keys the restore meant to retire.

    Raises:
        BackupError: no blobs, a file changed since verification, or the check failed.
        TokenBusy: a process holds the token open.
    """
    if not blobs:
        raise BackupError(verified.path, "no canary blob of the storage KEK: cannot prove the "
                                         "backup holds it")
    stamp = _stamp(now)
    token_dir = settings.token_dir
    staging = settings.home_dir / f".restore-{stamp}"
    with hold_token_lock(settings, exclusive=True, timeout=timeout):
        try:
            _stage(verified, staging)
            _carry_over(settings, token_dir, staging / TOKENS_NAME)
            _check_staged(settings, staging, tuple(pins), tuple(blobs), verified.path)
            removed = _swap(token_dir, staging / TOKENS_NAME, stamp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not settings.softhsm_conf_path.exists():
        write_softhsm_conf(settings)
    return RestoreReport(token_dir, verified.generation, removed, len(blobs), len(pins))


def _stage(verified: VerifiedBackup, staging: Path) -> None:
    staging.mkdir(mode=0o700)
    tokens = staging / TOKENS_NAME
    tokens.mkdir(mode=0o700)
    files = verified.manifest["files"]
    for rel in sorted(files):
        if not rel.startswith(f"{TOKENS_NAME}/"):
            continue
        target = staging / rel
        for parent in reversed(target.relative_to(staging).parents[:-1]):
            (staging / parent).mkdir(mode=0o700, exist_ok=True)
        data = (verified.path / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != files[rel]:
            raise BackupError(verified.path / rel, "SHA-256 differs from the manifest: backup "
                                                   "changed since it was verified")
        write_private(target, data)
    write_private(staging / CONF_NAME, softhsm_conf_text(tokens).encode())


def _carry_over(settings: Settings, token_dir: Path, staged: Path) -> None:
    """Copy the current token directory's other tokens (the root's among them) into the staged
    one, in place of any copy of them the backup held: a restore replaces the main token only.
    """
    if not token_dir.is_dir():
        return
    for folder in other_tokens(token_dir, settings.token_label):
        label = token_label_of(folder)
        for old in other_tokens(staged, settings.token_label):
            if token_label_of(old) == label:
                shutil.rmtree(old)
        shutil.copytree(folder, staged / folder.name, symlinks=False,
                        ignore=shutil.ignore_patterns(LOCK_NAME))


def _check_staged(settings: Settings, staging: Path, pins: tuple[KeyPin, ...],
                  blobs: tuple[tuple[str, bytes], ...], src: Path) -> None:
    fields = settings.model_dump(exclude={"pin", "so_pin", "softhsm2_conf"})
    fields.update(home=staging, softhsm2_conf=staging / CONF_NAME,
                  pkcs11_module=settings.module_path)
    if settings.pin_file is None and settings.pin is None:
        fields["pin_file"] = settings.secrets_dir / "user.pin"
    ok, reason = _in_child(_check_in_child, _CheckRequest(fields, pins, blobs), src, "check")
    if not ok:
        raise BackupError(src, f"refused: the backed-up token fails the check ({reason}); "
                               "current token left untouched")


def _check_in_child(request: _CheckRequest) -> tuple[bool, str]:
    """Child side: verify the pins on the staged token, unwrap each blob and destroy it.

    Returns (passed, reason): a failed check is a verdict to report, not an error of the child.
    """
    try:
        staged = Settings(**request.fields)
        check.verify_pins(staged, request.pins)
        with Hsm.open(staged).session() as s:
            for index, (label, blob) in enumerate(request.blobs):
                try:
                    s.destroy(s.unwrap_stored(label, blob))
                except HsmError as exc:
                    what = "canary" if index == 0 else f"key blob sample {index}"
                    return False, f"{what} does not unwrap under {label!r}: {exc.cause}"
        return True, f"{len(request.pins)} keys and {len(request.blobs)} blobs check"
    except MeterkeysError as exc:
        return False, str(exc)
    finally:
        close_all()


def _in_child(fn: Any, request: Any, where: Path, what: str) -> Any:
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return pool.submit(fn, request).result(CHECK_TIMEOUT_SECONDS)
    except BrokenProcessPool:
        raise BackupError(where, f"the {what} process died") from None
    except TimeoutError:
        raise BackupError(where, f"the {what} took longer than "
                                 f"{CHECK_TIMEOUT_SECONDS:g} s") from None
    except HsmError as exc:
        raise BackupError(where, f"{what} failed: {exc}") from None


def _swap(token_dir: Path, staged: Path, stamp: str) -> Path | None:
    replaced: Path | None = None
    if token_dir.exists():
        replaced = token_dir.with_name(f"{token_dir.name}.replaced-{stamp}")
        token_dir.rename(replaced)
    try:
        staged.rename(token_dir)
    except OSError:
        if replaced is not None:
            replaced.rename(token_dir)
        raise
    if replaced is not None:
        # The replaced token may hold keys the restore meant to be rid of (a destroyed or
        # substituted key). Deleted, not overwritten: on SSDs (wear levelling) and journaling
        # or copy-on-write file systems an overwrite lands elsewhere, so it would only pretend.
        shutil.rmtree(replaced)
    return replaced


__all__ = ["BackupResult", "RestoreReport", "VerifiedBackup", "backup", "canonical_manifest",
           "manifest_digest", "other_tokens", "restore", "spki_sha256", "token_label_of",
           "verify_backup"]
