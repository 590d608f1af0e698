"""The private staging folder: copies, modes, reuse only after re-hashing."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from lifecycle.errors import BatchError
from lifecycle.factory_import import staging


def _delivery(tmp_path: Path, data: bytes = b"a;b\r\n1;2\r\n") -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "x.csv").write_bytes(data)
    (drop / "x.csv.manifest.json").write_bytes(b"{}")
    return drop / "x.csv"


def test_stage_copies_both_files_into_a_private_folder(tmp_path: Path) -> None:
    original = _delivery(tmp_path)
    staged = staging.stage(tmp_path / "home", original)
    assert staged.data_file.read_bytes() == original.read_bytes()
    assert (staged.folder / "x.csv.manifest.json").read_bytes() == b"{}"
    assert staged.file_sha256 == hashlib.sha256(original.read_bytes()).hexdigest()
    assert staged.folder.parent == tmp_path / "home" / "staging"
    assert stat.S_IMODE(staged.folder.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(staged.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(staged.data_file.stat().st_mode) == 0o600
    original.write_bytes(b"swapped")
    assert staged.data_file.read_bytes() != b"swapped"
    staging.remove(staged.folder)
    assert not staged.folder.exists()
    assert os.listdir(tmp_path / "home" / "staging") == []


def test_a_rerun_reuses_the_staged_copy_only_when_it_still_hashes(tmp_path: Path) -> None:
    original = _delivery(tmp_path)
    first = staging.stage(tmp_path / "home", original)
    again = staging.stage(tmp_path / "home", original)
    assert again == first
    first.data_file.write_bytes(b"tampered")  # someone with our user's rights
    third = staging.stage(tmp_path / "home", original)
    assert third.data_file.read_bytes() == original.read_bytes()
    assert len(os.listdir(tmp_path / "home" / "staging")) == 1


def test_a_staging_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "home" / "staging").mkdir(parents=True)
    os.chmod(tmp_path / "home" / "staging", 0o777)  # noqa: S103 - the unsafe case
    with pytest.raises(BatchError, match="staging folder is not a private folder"):
        staging.stage(tmp_path / "home", _delivery(tmp_path))


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(BatchError, match=r"^nope\.csv: file does not exist$"):
        staging.stage(tmp_path / "home", tmp_path / "nope.csv")
