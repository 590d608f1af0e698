"""The binding message: every field counts, and no two contexts share a message."""

from __future__ import annotations

import dataclasses

import pytest

from lifecycle.meter_keys.binding import DOMAIN, BlobContext, message

CONTEXT = BlobContext("ACM0000000001", "41434D0000000001", 0, 1, "meterkeys-storage-kek")
BLOB = bytes(range(24))


@pytest.mark.parametrize("change", [
    pytest.param({"serial": "ACM0000000002"}, id="other-meter"),
    pytest.param({"system_title": "41434D0000000002"}, id="other-title"),
    pytest.param({"key_id": 1}, id="other-key-id"),
    pytest.param({"version": 2}, id="other-version"),
    pytest.param({"kek_label": "meterkeys-storage-kek-master"}, id="other-kek"),
])
def test_each_field_changes_the_message(change: dict[str, object]) -> None:
    assert message(dataclasses.replace(CONTEXT, **change), BLOB) != message(CONTEXT, BLOB)


def test_the_blob_changes_the_message() -> None:
    assert message(CONTEXT, BLOB[:-1] + b"\xff") != message(CONTEXT, BLOB)


def test_fields_are_length_prefixed_so_they_cannot_slide() -> None:
    # "AB" + "C..." and "A" + "BC...": the same concatenation, different messages.
    a = dataclasses.replace(CONTEXT, serial="AB", system_title="C")
    b = dataclasses.replace(CONTEXT, serial="A", system_title="BC")
    assert message(a, BLOB) != message(b, BLOB)


def test_the_message_is_domain_separated_and_title_case_insensitive() -> None:
    assert message(CONTEXT, BLOB).startswith(DOMAIN)
    lower = dataclasses.replace(CONTEXT, system_title=CONTEXT.system_title.lower())
    assert message(lower, BLOB) == message(CONTEXT, BLOB)


@pytest.mark.parametrize("change", [{"key_id": 256}, {"key_id": -1}, {"version": 0}],
                         ids=["key-id-256", "key-id-negative", "version-0"])
def test_out_of_range_fields_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        message(dataclasses.replace(CONTEXT, **change), BLOB)
