"""The installed moe-rt version (the CLI's `moe-rt version`, the server's /version and OpenAPI)."""
from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moe-rt")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"
