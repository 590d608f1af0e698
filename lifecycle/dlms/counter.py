"""The invocation counter rule (Green Book §9.2.7.2.4.1: a counter is used once per key).

A receiver keeps, per key (meterkeys: per key version), the last counter it accepted, and
refuses any counter at or below it: that is a replay, or a sender whose counter went back.
"""

from __future__ import annotations

from lifecycle.errors import CounterReplayed, DlmsError

MAX_COUNTER = 0xFFFFFFFF


def check_counter(last_seen: int | None, ic: int) -> None:
    """Accept ``ic`` only if it is above ``last_seen`` (anything in range when none was seen).

    Raises:
        CounterReplayed: ``ic`` is at or below ``last_seen``.
        DlmsError: ``ic`` does not fit 4 bytes.
    """
    if not 0 <= ic <= MAX_COUNTER:
        raise DlmsError("invocation counter", f"{ic} does not fit 4 bytes")
    if last_seen is not None and ic <= last_seen:
        raise CounterReplayed("invocation counter",
                              f"{ic} is not above the last one seen ({last_seen})")
