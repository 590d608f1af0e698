"""The ctypes path to the module, for what python-pkcs11 0.10.1 cannot pass: nested templates.

python-pkcs11 crashes the process when given ``CKA_UNWRAP_TEMPLATE`` as a nested dict (shared
reference "pkcs11.md" §6), so every object that carries one is made here, with the module's own
``C_*`` functions. ``ctypes.CDLL`` on a path python-pkcs11 has already loaded returns the same
instance (``dlopen``), so the calls share its ``C_Initialize`` state, sessions, login and object
handles; ``session.handle`` and ``obj.handle`` give the raw handles. ``C_Initialize`` and
``C_Finalize`` are never called here: python-pkcs11 owns them.

Every call holds the process's call lock (``lifecycle.hsm.boundary``): SoftHSM2 runs without its
own locks under python-pkcs11 (PKCS#11 v2.40 §5.4, NULL init arguments).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

import pkcs11
from pkcs11 import Attribute

from lifecycle.errors import PermanentHsmError, TransientHsmError
from lifecycle.hsm.boundary import CALL_LOCK, ckr_name

CK_ULONG = ctypes.c_ulong  # unsigned long: 8 bytes on LP64 (x86_64 Linux)
CK_BBOOL = ctypes.c_ubyte
CK_UNAVAILABLE_INFORMATION = CK_ULONG(-1).value
# CKR codes worth a retry (PKCS#11 v2.40 §5.1.1): the same classes as boundary.TRANSIENT.
_TRANSIENT_CKR = {0x02, 0x06, 0x30, 0x31, 0x32, 0x90, 0xB0, 0xB1, 0xB3, 0xE0}


class CK_ATTRIBUTE(ctypes.Structure):  # noqa: N801 - PKCS#11 name
    """``{type; pValue; ulValueLen}`` (24 bytes on LP64)."""

    _fields_ = [("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):  # noqa: N801 - PKCS#11 name
    """``{mechanism; pParameter; ulParameterLen}``."""

    _fields_ = [("mechanism", CK_ULONG), ("pParameter", ctypes.c_void_p),
                ("ulParameterLen", CK_ULONG)]


_SIGNATURES: dict[str, list[Any]] = {
    "C_GenerateKey": [CK_ULONG, ctypes.POINTER(CK_MECHANISM), ctypes.POINTER(CK_ATTRIBUTE),
                      CK_ULONG, ctypes.POINTER(CK_ULONG)],
    "C_GenerateKeyPair": [CK_ULONG, ctypes.POINTER(CK_MECHANISM), ctypes.POINTER(CK_ATTRIBUTE),
                          CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG,
                          ctypes.POINTER(CK_ULONG), ctypes.POINTER(CK_ULONG)],
    "C_GetAttributeValue": [CK_ULONG, CK_ULONG, ctypes.POINTER(CK_ATTRIBUTE), CK_ULONG],
}
_LIBS: dict[str, ctypes.CDLL] = {}


def _lib(module_path: str) -> ctypes.CDLL:
    lib = _LIBS.get(module_path)
    if lib is None:
        lib = ctypes.CDLL(module_path)
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = CK_ULONG
        _LIBS[module_path] = lib
    return lib


def _check(rv: int, operation: str, label: str | None) -> None:
    if rv == 0:
        return
    error = TransientHsmError if rv in _TRANSIENT_CKR else PermanentHsmError
    raise error(operation, ckr_name(rv), label)


class Template:
    """A ``CK_ATTRIBUTE`` array built from a mapping, nested templates included.

    bool -> CK_BBOOL, int -> CK_ULONG, bytes/str -> bytes, list of ints -> CK_ULONG array
    (``CKA_ALLOWED_MECHANISMS``), mapping -> nested ``CK_ATTRIBUTE`` array. The instance owns
    every buffer the array points to: keep it alive for the call.
    """

    def __init__(self, template: Mapping[int, Any]) -> None:
        self._keep: list[Any] = []
        items = list(template.items())
        self.count = len(items)
        self.array = (CK_ATTRIBUTE * max(self.count, 1))()
        for i, (attr, value) in enumerate(items):
            buf, length = self._pack(value)
            self.array[i].type = int(attr)
            self.array[i].pValue = ctypes.cast(buf, ctypes.c_void_p)
            self.array[i].ulValueLen = length

    def _pack(self, value: Any) -> tuple[Any, int]:
        buf: Any
        if isinstance(value, bool):
            buf = CK_BBOOL(1 if value else 0)
            self._keep.append(buf)
            return ctypes.pointer(buf), ctypes.sizeof(CK_BBOOL)
        if isinstance(value, int):
            buf = CK_ULONG(value)
            self._keep.append(buf)
            return ctypes.pointer(buf), ctypes.sizeof(CK_ULONG)
        if isinstance(value, str):
            value = value.encode("utf-8")
        if isinstance(value, (bytes, bytearray)):
            buf = ctypes.create_string_buffer(bytes(value), len(value) or 1)
            self._keep.append(buf)
            return buf, len(value)
        if isinstance(value, Mapping):
            nested = Template(value)
            self._keep.append(nested)
            return nested.array, nested.count * ctypes.sizeof(CK_ATTRIBUTE)
        if isinstance(value, (list, tuple)):
            buf = (CK_ULONG * max(len(value), 1))(*[int(v) for v in value])
            self._keep.append(buf)
            return buf, len(value) * ctypes.sizeof(CK_ULONG)
        raise TypeError(f"cannot pack a template value of type {type(value).__name__}")

    @property
    def pointer(self) -> Any:
        return ctypes.cast(self.array, ctypes.POINTER(CK_ATTRIBUTE))


def generate_key(session: Any, module_path: str, mechanism: int, template: Mapping[int, Any],
                 label: str | None = None) -> int:
    """``C_GenerateKey`` with a template that may nest; return the new object's handle.

    Raises:
        PermanentHsmError: the module refused (the CKR code is the cause).
    """
    tpl = Template(template)
    mech = CK_MECHANISM(int(mechanism), None, 0)
    handle = CK_ULONG(0)
    with CALL_LOCK:
        rv = _lib(module_path).C_GenerateKey(int(session.handle), ctypes.byref(mech),
                                             tpl.pointer, tpl.count, ctypes.byref(handle))
    _check(rv, "generate key", label)
    return int(handle.value)


def generate_key_pair(session: Any, module_path: str, mechanism: int,
                      public: Mapping[int, Any], private: Mapping[int, Any],
                      label: str | None = None) -> tuple[int, int]:
    """``C_GenerateKeyPair`` with templates that may nest; return (public, private) handles.

    Raises:
        PermanentHsmError: the module refused.
    """
    pub, prv = Template(public), Template(private)
    mech = CK_MECHANISM(int(mechanism), None, 0)
    h_pub, h_prv = CK_ULONG(0), CK_ULONG(0)
    with CALL_LOCK:
        rv = _lib(module_path).C_GenerateKeyPair(
            int(session.handle), ctypes.byref(mech), pub.pointer, pub.count, prv.pointer,
            prv.count, ctypes.byref(h_pub), ctypes.byref(h_prv))
    _check(rv, "generate key pair", label)
    return int(h_pub.value), int(h_prv.value)


def get_attribute(session: Any, module_path: str, handle: int, attr: int,
                  label: str | None = None) -> bytes | None:
    """Read one attribute's raw bytes (length, then value); None if absent or unreadable."""
    lib = _lib(module_path)
    probe = CK_ATTRIBUTE(int(attr), None, 0)
    with CALL_LOCK:
        rv = lib.C_GetAttributeValue(int(session.handle), handle, ctypes.byref(probe), 1)
        if rv or probe.ulValueLen == CK_UNAVAILABLE_INFORMATION:
            return None
        buf = ctypes.create_string_buffer(max(probe.ulValueLen, 1))
        probe.pValue = ctypes.cast(buf, ctypes.c_void_p)
        rv = lib.C_GetAttributeValue(int(session.handle), handle, ctypes.byref(probe), 1)
    _check(rv, "read attribute", label)
    return buf.raw[: probe.ulValueLen]


def get_nested_template(session: Any, module_path: str, handle: int,
                        attr: int = Attribute.UNWRAP_TEMPLATE,
                        label: str | None = None) -> dict[int, bytes] | None:
    """Read an attribute-array attribute (``CKA_UNWRAP_TEMPLATE``) as ``{type: raw value}``.

    Three calls (PKCS#11 v2.40 §5.7, C_GetAttributeValue on arrays): the array's length, then
    each element's type and length, then the values. None if the object has no such attribute.

    Raises:
        PermanentHsmError: the module refused a read it had announced.
    """
    lib = _lib(module_path)
    sess = int(session.handle)
    outer = CK_ATTRIBUTE(int(attr), None, 0)
    with CALL_LOCK:
        rv = lib.C_GetAttributeValue(sess, handle, ctypes.byref(outer), 1)
        if rv or outer.ulValueLen in (0, CK_UNAVAILABLE_INFORMATION):
            return None
        n = outer.ulValueLen // ctypes.sizeof(CK_ATTRIBUTE)
        inner = (CK_ATTRIBUTE * n)()
        outer.pValue = ctypes.cast(inner, ctypes.c_void_p)
        rv = lib.C_GetAttributeValue(sess, handle, ctypes.byref(outer), 1)
        _check(rv, "read unwrap template", label)
        buffers = []
        for i in range(n):
            buf = ctypes.create_string_buffer(max(inner[i].ulValueLen, 1))
            buffers.append(buf)
            inner[i].pValue = ctypes.cast(buf, ctypes.c_void_p)
        rv = lib.C_GetAttributeValue(sess, handle, ctypes.byref(outer), 1)
    _check(rv, "read unwrap template", label)
    return {int(inner[i].type): buffers[i].raw[: inner[i].ulValueLen] for i in range(n)}


def decode_ulongs(raw: bytes) -> list[int]:
    """CK_ULONG array bytes (native order, e.g. CKA_ALLOWED_MECHANISMS) -> ints."""
    size = ctypes.sizeof(CK_ULONG)
    return [int.from_bytes(raw[i:i + size], "little") for i in range(0, len(raw), size)]


def encode_ulongs(values: Sequence[int]) -> bytes:
    """Ints -> CK_ULONG array bytes (native order)."""
    size = ctypes.sizeof(CK_ULONG)
    return b"".join(int(v).to_bytes(size, "little") for v in values)


def attribute_mapper() -> pkcs11.attributes.AttributeMapper:
    """Return python-pkcs11's attribute mapper, taught to pack ``CKA_ALLOWED_MECHANISMS``.

    A flat CK_ULONG array holds no pointers, so python-pkcs11 can pass it once told how;
    only nested templates need the functions above.
    """
    mapper = pkcs11.attributes.AttributeMapper()
    mapper.register_handler(Attribute.ALLOWED_MECHANISMS, encode_ulongs, decode_ulongs)
    return mapper


__all__ = ["Template", "attribute_mapper", "decode_ulongs", "encode_ulongs", "generate_key",
           "generate_key_pair", "get_attribute", "get_nested_template"]
