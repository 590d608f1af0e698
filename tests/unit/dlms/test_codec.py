"""The pure DLMS codec: key_data and general-glo-ciphering known answers, strict decoding tables,
the invocation counter rule and the key-free checks of a proof."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from lifecycle.dlms import apdu, key_transfer
from lifecycle.dlms.apdu import GloCiphered, SecurityControl
from lifecycle.dlms.counter import check_counter
from lifecycle.dlms.key_transfer import TRANSFER_ORDER, KeyEntry
from lifecycle.dlms.proof import CHALLENGE_BYTES, new_challenge, parse_answer
from lifecycle.errors import CounterReplayed, DlmsError, MeterkeysError, ProofRefused
from lifecycle.policy import KeyId

DATA = Path(__file__).parents[2] / "data"
GCM = json.loads((DATA / "dlms_gcm.json").read_text())["green_book_gcm"]
KEY_DATA = json.loads((DATA / "rfc3394.json").read_text())["dlms_key_data"]
WRAPPED = bytes.fromhex(json.loads((DATA / "dlms_gcm.json").read_text())["rfc3394_4_1"]["wrapped"])
GREEN_BOOK_APDU = bytes.fromhex("DB08" + GCM["system_title"] + "1E" + GCM["security_control"]
                                + GCM["invocation_counter"] + GCM["ciphertext"] + GCM["tag"])


def _h(field: str) -> bytes:
    return bytes.fromhex(GCM[field])


# --- key_data -----------------------------------------------------------------------------------
def test_key_data_known_answer_encodes_and_decodes() -> None:
    expected = bytes.fromhex(KEY_DATA["key_data"])
    assert key_transfer.encode([KeyEntry(KeyId.GUEK, WRAPPED)]) == expected
    assert key_transfer.decode(expected) == [KeyEntry(KeyId.GUEK, WRAPPED)]


def test_key_data_matches_gurux_global_key_transfer() -> None:
    from gurux_dlms.enums import InterfaceType
    from gurux_dlms.objects import GXDLMSSecuritySetup
    from gurux_dlms.secure import GXDLMSSecureClient

    kek = bytes.fromhex(KEY_DATA["kek"])
    keys = [(int(k), bytes([0x10 + k]) * 16) for k in TRANSFER_ORDER]
    ours = key_transfer.encode([KeyEntry(KeyId(k), aes_key_wrap(kek, v)) for k, v in keys])
    client = GXDLMSSecureClient(True)
    client.interfaceType = InterfaceType.WRAPPER  # one frame: the action request as it is
    (frame,) = GXDLMSSecuritySetup().globalKeyTransfer(client, kek, keys)
    # The action's parameter, key_data, ends the method request.
    assert bytes(frame).endswith(ours)


def test_key_data_round_trips_suite_2_and_the_transfer_order() -> None:
    entries = [KeyEntry(k, bytes([k]) * 40) for k in TRANSFER_ORDER]
    data = key_transfer.encode(entries)
    assert key_transfer.decode(data) == entries
    assert [e.key_id for e in key_transfer.decode(data)][-1] == KeyId.KEK


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(KEY_DATA["key_data"][:-2], "truncated", id="truncated"),
    pytest.param(KEY_DATA["key_data"] + "00", "1 trailing bytes", id="trailing"),
    pytest.param("02" + KEY_DATA["key_data"][2:], "expected tag 01", id="not-an-array"),
    pytest.param("0100", "holds no key", id="empty"),
    pytest.param("010102031600", "structure of 3 elements", id="three-elements"),
    pytest.param("0101020211", "key_id", id="not-an-enum"),
    pytest.param("01010202160709" + "18" + "00" * 24, "unknown key id 7", id="unknown-id"),
    pytest.param("01010202160008" + "18" + "00" * 24, "key_wrapped", id="not-octet-string"),
    pytest.param("01010202160009" + "10" + "00" * 16, "not an RFC 3394 wrap", id="short-wrap"),
    pytest.param("0102" + ("0202160009" + "18" + "00" * 24) * 2, "appears twice", id="twice"),
    pytest.param("01810102021600091800", "shortest form", id="long-form-length"),
    pytest.param("0185", "5 length bytes", id="length-too-long"),
])
def test_key_data_decoding_is_strict(data: str, message: str) -> None:
    with pytest.raises(DlmsError, match=message) as caught:
        key_transfer.decode(bytes.fromhex(data))
    assert isinstance(caught.value, MeterkeysError) and caught.value.where.startswith("key_data")


def test_key_data_encoding_refuses_what_decoding_refuses() -> None:
    with pytest.raises(DlmsError, match="twice"):
        key_transfer.encode([KeyEntry(KeyId.GUEK, WRAPPED)] * 2)
    with pytest.raises(DlmsError, match="holds no key"):
        key_transfer.encode([])


@pytest.mark.parametrize("n", [0, 0x7F, 0x80, 0xFF, 0x100, 0xFFFFFFFF])
def test_axdr_length_round_trips(n: int) -> None:
    reader = key_transfer.Reader(key_transfer.encode_length(n), "x")
    assert reader.length() == n
    reader.end()


# --- APDU ---------------------------------------------------------------------------------------
def test_green_book_example_agrees_with_aesgcm() -> None:
    iv = apdu.gcm_iv(_h("system_title"), int(GCM["invocation_counter"], 16))
    out = AESGCM(_h("encryption_key")).encrypt(iv, _h("plaintext"),
                                               _h("security_control") + _h("authentication_key"))
    assert out[:-4] == _h("ciphertext") + _h("tag")  # the DLMS tag is GCM's first 12 bytes


def test_green_book_apdu_parses_and_encodes() -> None:
    parsed = apdu.parse(GREEN_BOOK_APDU)
    assert parsed == GloCiphered(_h("system_title"), 0x30, 0x01234567, _h("ciphertext"),
                                 _h("tag"))
    assert parsed.iv == _h("system_title") + _h("invocation_counter")
    assert apdu.encode(parsed) == GREEN_BOOK_APDU


def test_gurux_builds_the_same_apdu() -> None:
    from gurux_dlms.AesGcmParameter import AesGcmParameter
    from gurux_dlms.enums.Security import Security
    from gurux_dlms.GXDLMSChippering import GXDLMSChippering

    p = AesGcmParameter(apdu.GENERAL_GLO_CIPHERING, _h("system_title"), _h("encryption_key"),
                        _h("authentication_key"))
    p.security = Security.AUTHENTICATION_ENCRYPTION
    p.invocationCounter = int(GCM["invocation_counter"], 16)
    assert bytes(GXDLMSChippering.encryptAesGcm(p, _h("plaintext"))) == GREEN_BOOK_APDU


@pytest.mark.parametrize(("control", "value"), [
    pytest.param(SecurityControl(0), 0x30, id="suite0-auth-enc"),
    pytest.param(SecurityControl(2), 0x32, id="suite2"),
    pytest.param(SecurityControl(1, encrypted=False), 0x11, id="auth-only"),
    pytest.param(SecurityControl(0, broadcast=True, compressed=True), 0xF0, id="broadcast-comp"),
])
def test_security_control_byte(control: SecurityControl, value: int) -> None:
    assert control.to_byte() == value
    assert SecurityControl.from_byte(value) == control


@pytest.mark.parametrize(("data", "message"), [
    pytest.param(GREEN_BOOK_APDU[:-1], "truncated", id="truncated"),
    pytest.param(GREEN_BOOK_APDU + b"\x00", "trailing", id="trailing"),
    pytest.param(b"\xDD" + GREEN_BOOK_APDU[1:], "expected tag DB", id="other-apdu"),
    pytest.param(GREEN_BOOK_APDU[:1] + b"\x07" + GREEN_BOOK_APDU[2:], "not 8", id="short-title"),
    pytest.param(GREEN_BOOK_APDU[:11] + b"\x10" + GREEN_BOOK_APDU[12:], "authenticated-and-enc",
                 id="auth-only"),
    pytest.param(GREEN_BOOK_APDU[:11] + b"\x70" + GREEN_BOOK_APDU[12:], "unicast",
                 id="broadcast"),
    pytest.param(bytes.fromhex("DB08" + GCM["system_title"] + "05" + "3000000001"),
                 "cannot hold", id="no-room-for-tag"),
])
def test_apdu_parsing_is_strict(data: bytes, message: str) -> None:
    with pytest.raises(DlmsError, match=message):
        apdu.parse(data)


def test_apdu_refuses_out_of_range_fields() -> None:
    with pytest.raises(DlmsError, match="does not fit"):
        apdu.gcm_iv(bytes(8), 1 << 32)
    with pytest.raises(DlmsError, match="not 8"):
        apdu.gcm_iv(bytes(7), 1)
    with pytest.raises(DlmsError, match="tag"):
        apdu.encode(GloCiphered(bytes(8), 0x30, 1, b"x", bytes(16)))


# --- counter and proof --------------------------------------------------------------------------
@pytest.mark.parametrize(("last", "ic", "error"), [
    pytest.param(None, 0, None, id="first-zero"),
    pytest.param(None, 5, None, id="first"),
    pytest.param(4, 5, None, id="above"),
    pytest.param(5, 5, CounterReplayed, id="equal"),
    pytest.param(6, 5, CounterReplayed, id="below"),
    pytest.param(None, -1, DlmsError, id="negative"),
    pytest.param(None, 1 << 32, DlmsError, id="too-big"),
])
def test_counter_rule(last: int | None, ic: int, error: type[Exception] | None) -> None:
    if error is None:
        check_counter(last, ic)
    else:
        with pytest.raises(error):
            check_counter(last, ic)


def _answer(title: bytes = b"ABCDEFGH", sc: int = 0x30, ic: int = 7,
            length: int = CHALLENGE_BYTES) -> bytes:
    return apdu.encode(GloCiphered(title, sc, ic, bytes(length), bytes(12)))


@pytest.mark.parametrize(("answer", "last", "error", "message"), [
    pytest.param(_answer(), None, None, "", id="good"),
    pytest.param(_answer(title=b"ZZZZZZZZ"), None, ProofRefused, "system title", id="other-meter"),
    pytest.param(_answer(sc=0x31), None, ProofRefused, "suite 0", id="other-suite"),
    pytest.param(_answer(length=15), None, ProofRefused, "15 bytes", id="short-ciphertext"),
    pytest.param(_answer(ic=7), 7, CounterReplayed, "not above", id="replayed"),
    pytest.param(b"\xDB", None, DlmsError, "truncated", id="malformed"),
])
def test_proof_checks_without_a_key(answer: bytes, last: int | None,
                                    error: type[Exception] | None, message: str) -> None:
    challenge = new_challenge()
    if error is None:
        assert parse_answer(answer, b"ABCDEFGH", 0, challenge, last).invocation_counter == 7
        return
    with pytest.raises(error, match=message):
        parse_answer(answer, b"ABCDEFGH", 0, challenge, last)


def test_challenges_are_fresh() -> None:
    assert len({new_challenge() for _ in range(100)}) == 100
    assert len(new_challenge()) == 16


def test_dlms_errors_pickle() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(CounterReplayed("invocation counter", "replay")))  # noqa: S301
    assert isinstance(error, CounterReplayed) and error.where == "invocation counter"
