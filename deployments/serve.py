"""Deployments as code: what `meterkeys serve` offers in the Prefect UI."""

from __future__ import annotations

from typing import Any

from flows.factory_import import factory_import


def deployments() -> list[Any]:
    """Return the deployments of meterkeys (one per lifecycle process built so far)."""
    return [
        factory_import.to_deployment(
            name="factory-import",
            description="Verify a manufacturer's factory batch and take its meters' keys "
                        "into HSM custody. Parameters: the batch data file (its manifest lies "
                        "beside it), the vendor, and the principal running the import.",
            tags=["meterkeys", "import"],
            concurrency_limit=2,
        ),
    ]


def main() -> None:
    """Serve every deployment from this process until interrupted."""
    import prefect

    prefect.serve(*deployments(), limit=4)


if __name__ == "__main__":
    main()
