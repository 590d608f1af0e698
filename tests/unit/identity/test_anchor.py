"""The principals' anchor file: parse errors, create once, append the second once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lifecycle.errors import AuditError
from lifecycle.identity import anchor
from lifecycle.identity.anchor import Anchor

FP1 = "sha256:" + "A" * 43
FP2 = "sha256:" + "B" * 43
ROOT = json.dumps({"installation": "inst-1", "root": "sofia", "root_fingerprint": FP1})
SECOND = json.dumps({"second": "sam", "second_fingerprint": FP2})

PARSE_ERRORS = [
    pytest.param("", "0 lines", id="empty"),
    pytest.param("not json\n", "line 1: not a line with exactly", id="not-json"),
    pytest.param("[1]\n", "line 1: not a line", id="not-object"),
    pytest.param(ROOT.replace('"root":', '"boss":') + "\n", "line 1: not a line",
                 id="other-field"),
    pytest.param(json.dumps({"installation": "i", "root": "r", "root_fingerprint": FP1,
                             "x": "y"}) + "\n", "line 1: not a line", id="extra-field"),
    pytest.param(ROOT.replace(FP1, "abc") + "\n", "root_fingerprint is not a fingerprint",
                 id="bad-fingerprint"),
    pytest.param(ROOT.replace('"sofia"', '" sofia"') + "\n", "root is not a name",
                 id="padded-name"),
    pytest.param(ROOT.replace('"sofia"', "7") + "\n", "root is not a name", id="number"),
    pytest.param(SECOND + "\n", "line 1: not a line", id="second-first"),
    pytest.param(ROOT + "\n" + ROOT + "\n", "line 2: not a line", id="root-twice"),
    pytest.param(ROOT + "\n" + SECOND + "\n" + SECOND + "\n", "3 lines", id="three-lines"),
]


@pytest.mark.parametrize(("text", "message"), PARSE_ERRORS)
def test_a_malformed_anchor_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(AuditError, match=message):
        anchor.parse(text, "principals.anchor")


def test_parse_root_and_second() -> None:
    assert anchor.parse(ROOT + "\n", "a") == Anchor("inst-1", "sofia", FP1)
    assert anchor.parse(ROOT + "\n" + SECOND + "\n", "a") == Anchor("inst-1", "sofia", FP1,
                                                                   "sam", FP2)


def test_write_root_once_and_idempotently(tmp_path: Path) -> None:
    folder = tmp_path / "witness"
    assert anchor.read(folder) is None
    anchor.write_root(folder, "inst-1", "sofia", FP1)
    anchor.write_root(folder, "inst-1", "sofia", FP1)  # a re-run writes nothing
    path = anchor.path_of(folder)
    assert path.stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o777 == 0o700
    assert anchor.read(folder) == Anchor("inst-1", "sofia", FP1)
    with pytest.raises(AuditError, match="names root 'sofia'"):
        anchor.write_root(folder, "inst-1", "eve", FP2)
    with pytest.raises(AuditError, match="of installation inst-1"):
        anchor.write_root(folder, "inst-2", "sofia", FP1)
    assert path.read_text().count("\n") == 1


def test_add_second_once(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="cannot open"):
        anchor.add_second(tmp_path, "inst-1", "sam", FP2)
    anchor.write_root(tmp_path, "inst-1", "sofia", FP1)
    with pytest.raises(AuditError, match="belongs to installation inst-1"):
        anchor.add_second(tmp_path, "inst-2", "sam", FP2)
    anchor.add_second(tmp_path, "inst-1", "sam", FP2)
    anchor.add_second(tmp_path, "inst-1", "sam", FP2)  # no-op
    with pytest.raises(AuditError, match="already names the second security officer 'sam'"):
        anchor.add_second(tmp_path, "inst-1", "eve", FP1)
    assert anchor.read(tmp_path) == Anchor("inst-1", "sofia", FP1, "sam", FP2)


def test_a_shared_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o755)  # noqa: S103 - the shared folder under test
    with pytest.raises(AuditError, match="open to other users"):
        anchor.write_root(folder, "inst-1", "sofia", FP1)
