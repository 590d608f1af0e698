"""An inventory with principals enrolled (``tests.identities``) and a witness folder of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.identities import Identities


@pytest.fixture
def ids(settings, engine, tmp_path: Path) -> Identities:  # type: ignore[no-untyped-def]
    """Principals of this test's inventory: test-so (root), test-so-2, operator, auditor."""
    own = settings.model_copy(update={"witness_dir": tmp_path / "witness"})
    identities = Identities(own, engine, tmp_path / "keys")
    identities.bootstrap()
    return identities
