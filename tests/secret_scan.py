"""Search stored bytes for plaintext meter keys and token PINs (test helper).

Every function returns human-readable hit descriptions naming the place and the *needle
name* (e.g. ``"acme0000000001.guek/hex-upper"``), never the secret itself, so a failing
assertion cannot leak what it found.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

KEY_FIELDS = ("guek", "gbek", "gak", "kek")


def _forms(name: str, raw: bytes) -> dict[str, bytes]:
    return {
        f"{name}/raw": raw,
        f"{name}/hex-lower": raw.hex().encode(),
        f"{name}/hex-upper": raw.hex().upper().encode(),
        f"{name}/base64": base64.b64encode(raw).rstrip(b"="),
        f"{name}/base64-urlsafe": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }


def needles(secret_records: Iterable[Mapping[str, Any]],
            secrets_dir: Path | None = None) -> dict[str, bytes]:
    """Return ``{needle name: bytes to look for}``.

    For every key of every meter record (``read_meter_secrets`` output): raw bytes, lower-
    and upper-case hex, standard and urlsafe base64 (padding stripped, so the needle also
    matches inside longer base64 runs that start at the same offset). With ``secrets_dir``,
    also the token PINs from ``user.pin`` and ``so.pin`` (as stored, stripped).
    """
    out: dict[str, bytes] = {}
    for record in secret_records:
        for field in KEY_FIELDS:
            if record.get(field):
                out.update(_forms(f"{record['serial']}.{field}", bytes.fromhex(record[field])))
    if secrets_dir is not None:
        for pin_file in ("user.pin", "so.pin"):
            pin = (secrets_dir / pin_file).read_text(encoding="utf-8").strip().encode()
            if len(pin) < 4:
                raise ValueError(f"{pin_file} is too short to search for safely")
            out[f"pin:{pin_file}"] = pin
    for name, value in out.items():
        if len(value) < 4:
            raise ValueError(f"needle {name} is too short to search for safely")
    return out


def scan_bytes(blob: bytes, needles: Mapping[str, bytes], where: str = "<bytes>") -> list[str]:
    """Return ``"<where>: <needle name>"`` for each needle found in ``blob``."""
    return [f"{where}: {name}" for name, value in needles.items() if value in blob]


def _b64_candidates(blob: bytes) -> list[tuple[str, bytes]]:
    """Decode the ways Prefect stores results: JSON ``{"result": "<base64>"}`` (task
    results, also nested under other keys), or a whole file that is base64 (flow results)."""
    found: list[tuple[str, bytes]] = []

    def b64(text: str) -> bytes | None:
        compact = "".join(text.split())
        if len(compact) < 8:
            return None
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                return decode(compact + "=" * (-len(compact) % 4))
            except (binascii.Error, ValueError):
                continue
        return None

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and k in ("result", "data", "value"):
                    decoded = b64(v)
                    if decoded is not None:
                        found.append((f"{path}.{k}(base64)", decoded))
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        walk(json.loads(blob), "json")
    stripped = blob.strip()
    if stripped and not stripped.startswith((b"{", b"[")):
        try:
            decoded = b64(stripped.decode("ascii"))
        except UnicodeDecodeError:
            decoded = None
        if decoded is not None:
            found.append(("whole-file(base64)", decoded))
    return found


def scan_file(path: Path, needles: Mapping[str, bytes]) -> list[str]:
    """Scan one file's bytes, plus base64-decoded Prefect result payloads in it."""
    try:
        blob = path.read_bytes()
    except OSError as exc:
        return [f"{path}: unreadable ({type(exc).__name__})"]
    hits = scan_bytes(blob, needles, str(path))
    for label, decoded in _b64_candidates(blob):
        hits += scan_bytes(decoded, needles, f"{path} [{label}]")
    return hits


def _excluded(path: Path, exclude: set[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == e or e in resolved.parents for e in exclude)


def scan_tree(root: Path, needles: Mapping[str, bytes],
              exclude: set[Path] | None = None) -> list[str]:
    """Scan every regular file under ``root`` (including SQLite -wal/-shm files), skipping
    the files and directories in ``exclude``."""
    excl = {p.resolve() for p in (exclude or set())}
    hits: list[str] = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and not _excluded(path, excl):
            hits += scan_file(path, needles)
    return hits


def files_under(root: Path, exclude: set[Path] | None = None) -> list[Path]:
    """The files ``scan_tree`` would read (to prove a scan was not empty)."""
    excl = {p.resolve() for p in (exclude or set())}
    return [p for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and not _excluded(p, excl)]


def _value_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


def scan_sqlite(path: Path, needles: Mapping[str, bytes]) -> list[str]:
    """Read every column value of every table of a SQLite database (read-only; pending
    -wal content is visible through SQLite)."""
    hits: list[str] = []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.text_factory = bytes
        tables = [r[0].decode() for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            quoted = table.replace('"', '""')
            # Table names come from sqlite_master of the file under test, quoted.
            cursor = conn.execute(f'SELECT * FROM "{quoted}"')  # noqa: S608
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    blob = _value_bytes(value)
                    if blob is None:
                        continue
                    where = f"sqlite {path.name}:{table}.{column}"
                    found = scan_bytes(blob, needles, where)
                    for label, decoded in _b64_candidates(blob):
                        found += scan_bytes(decoded, needles, f"{where} [{label}]")
                    hits += found
    finally:
        conn.close()
    return sorted(set(hits))


def postgres_schema(db_url: str) -> str:
    """The schema named by ``?options=-csearch_path=<schema>`` in ``db_url``."""
    options = parse_qs(urlsplit(db_url).query).get("options", [""])[0]
    for part in unquote(options).split():
        if part.startswith("-csearch_path="):
            return part.removeprefix("-csearch_path=").split(",")[0]
    raise ValueError("db_url has no search_path option")


def _pg_base_url(db_url: str) -> str:
    return db_url.split("?", 1)[0]


def scan_postgres(db_url: str, needles: Mapping[str, bytes]) -> list[str]:
    """Dump the test schema with ``pg_dump`` and scan the dump; without ``pg_dump``, SELECT
    every column of every table of the schema through psycopg."""
    schema = postgres_schema(db_url)
    parts = urlsplit(_pg_base_url(db_url))
    try:
        dump = subprocess.run(
            ["pg_dump", f"--schema={schema}", "-h", parts.hostname or "127.0.0.1",
             "-p", str(parts.port or 5432), "-U", parts.username or "postgres",
             parts.path.lstrip("/") or "test"],
            check=True, capture_output=True, timeout=60).stdout
    except FileNotFoundError:
        return _scan_postgres_select(db_url, schema, needles)
    if f"CREATE TABLE {schema}.".encode() not in dump:
        raise AssertionError(f"pg_dump of schema {schema} holds no table")
    # bytea columns are dumped as \x<hex>, which the hex-lower needles cover.
    return scan_bytes(dump, needles, f"pg_dump --schema={schema}")


def _scan_postgres_select(db_url: str, schema: str,
                          needles: Mapping[str, bytes]) -> list[str]:
    import psycopg
    from psycopg import sql

    hits: list[str] = []
    with psycopg.connect(_pg_base_url(db_url)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,))]
        for table in tables:
            cursor = conn.execute(sql.SQL("SELECT * FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table)))
            columns = [d.name for d in cursor.description or []]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    blob = _value_bytes(value)
                    if blob is not None:
                        hits += scan_bytes(blob, needles, f"postgres {schema}.{table}.{column}")
    return sorted(set(hits))


def scan_text(text: str, needles: Mapping[str, bytes], where: str) -> list[str]:
    """Scan a string (log message, artifact body, captured output) by its UTF-8 bytes."""
    return scan_bytes(text.encode("utf-8", "surrogatepass"), needles, where)


# --- more kinds of needle: named keys, private keys, PINs and passphrases from their files ---
def _checked(found: dict[str, bytes]) -> dict[str, bytes]:
    for name, value in found.items():
        if len(value) < 4:
            raise ValueError(f"needle {name} is too short to search for safely")
    return found


def needles_of_keys(keys: Mapping[str, bytes]) -> dict[str, bytes]:
    """Return the needles of named raw secrets (``{"dso:SERIAL.guek": key}``) in every form
    ``needles`` searches for a meter key: raw, hex in both cases, base64 in both alphabets."""
    out: dict[str, bytes] = {}
    for name, raw in keys.items():
        out.update(_forms(name, raw))
    return _checked(out)


def private_scalar(pem: bytes, passphrase: bytes | None = None) -> tuple[bytes, int | None]:
    """Return a PEM private key's secret as raw bytes (EC: the private value, big-endian, as
    long as the curve's order; Ed25519: the 32-byte seed) and, for EC, as an integer."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    private = serialization.load_pem_private_key(pem, password=passphrase)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        value = private.private_numbers().private_value
        return value.to_bytes((private.curve.key_size + 7) // 8, "big"), value
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.private_bytes_raw(), None
    raise ValueError(f"no private scalar for a {type(private).__name__}")


def needles_of_private_keys(pems: Mapping[str, bytes],
                            passphrases: Mapping[str, bytes] | None = None) -> dict[str, bytes]:
    """Return the needles of named PEM private keys: their private scalar in the forms of
    ``needles_of_keys``, and, for EC keys, in decimal (``<name>/decimal``)."""
    out: dict[str, bytes] = {}
    for name, pem in pems.items():
        raw, value = private_scalar(pem, (passphrases or {}).get(name))
        out.update(_forms(name, raw))
        if value is not None:
            out[f"{name}/decimal"] = str(value).encode()
    return _checked(out)


def needles_of_secret_files(files: Iterable[Path], kind: str = "pin") -> dict[str, bytes]:
    """Return ``{"<kind>:<file name>": its text, stripped}`` for PIN or passphrase files (as
    ``needles`` reads ``user.pin`` and ``so.pin``)."""
    out = {f"{kind}:{path.name}": path.read_text(encoding="utf-8").strip().encode()
           for path in files}
    return _checked(out)
