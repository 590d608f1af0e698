"""Whether an HSM ceiling was measured on cores of its own.

The ceiling loop in N processes on N free cores runs about N times as fast as in one process
(1.94 to 2.04 times on this project's 2-core machines). When another load shares the cores
while it is measured, the N processes scale worse, the N-process ceiling comes out low, and a
ratio against it comes out high: on 2026-11-30 a claim measured 0.63 against a 2-process ceiling
that ran 1.6 times the 1-process one, where the runs before and after measured 0.54 and 0.55.
A benchmark reports the scaling of the measurement it took its ceiling from, warns below
``STEADY``, and says in its JSON whether the ceiling was steady (``fields``).
"""

from __future__ import annotations

import sys
from typing import Any

STEADY = 0.9  # the N-process ceiling at least 0.9 N times the 1-process one


def scaling(one: float, many: float, processes: int) -> float:
    """How close the N-process ceiling came to N times the 1-process one (1.0: exactly)."""
    return many / (one * processes) if one > 0 and processes > 0 else 0.0


def steady(one: float, many: float, processes: int) -> bool:
    """Return whether a ceiling measurement scaled as free cores do; warn on stderr if not."""
    scaled = scaling(one, many, processes)
    if processes > 1 and scaled < STEADY:
        print(f"warning: the {processes}-process HSM ceiling ran {scaled * processes:.2f} times "
              f"the 1-process one (free cores give about {processes}): another load shared "
              "the cores while it was measured, so the ratio comes out too high. Run again on "
              "a quiet machine.", file=sys.stderr)
        return False
    return True


def fields(one: float, many: float, processes: int) -> dict[str, Any]:
    """A benchmark's JSON fields on its ceiling: ``ceiling_scaling`` and ``ceiling_steady``
    (warned about on stderr when not steady)."""
    return {"ceiling_scaling": round(scaling(one, many, processes), 3),
            "ceiling_steady": steady(one, many, processes)}
