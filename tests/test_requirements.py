"""requirements/constraints.txt pins every declared dependency to a version inside setup.py's range."""
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt"


def pins() -> dict[str, str]:
    """name -> pinned version, for this interpreter (lines whose marker does not hold are skipped)."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(req.name)] = spec.version
    return out


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = pins()
    declared = [Requirement(r) for r in requires("adaptune")]
    for extra in ("", "kernels", "test"):
        for req in declared:
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            name = canonicalize_name(req.name)
            assert name in pinned, f"{req.name} is declared in setup.py but not pinned in {CONSTRAINTS.name}"
            assert req.specifier.contains(pinned[name], prereleases=True), \
                f"{req.name}=={pinned[name]} in {CONSTRAINTS.name} is outside setup.py's {req}"
