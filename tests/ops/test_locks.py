"""The lock files (requirements/*.lock.txt) are what scripts/setup.sh and deploy/Dockerfile install.

They must pin every package to one version with the hashes of its files (pip's --require-hashes
refuses anything else), the runtime lock must cover pyproject's dependencies and carry no test tool
(the image installs it alone), and the test lock must agree with the runtime lock wherever they share
a package (setup.sh installs both in one pip command). The locks are written by scripts/lock.sh.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent.parent
REQ = REPO / "requirements"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
LOCKS = ["app.lock.txt", "test.lock.txt", "rasa.lock.txt", "models.lock.txt"]
# Test tools by name, beyond the `test` extra itself (what it might pull in, or someone might add).
TEST_TOOLS = re.compile(r"^(pytest.*|hypothesis.*|playwright|schemathesis|noida-db|kubernetes-validate|pip-tools|"
                        r"coverage|mypy|ruff|uv|iniconfig|pluggy|harfile|pyrate-limiter)$")


def parse_lock(path: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, sha256 hashes); fails on a requirement that is not `name==version --hash=...`."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    pins: dict[str, tuple[str, set[str]]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"{path.name}:{number}: not an exact pin with hashes: {line[:120]}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = (match.group(2), set(re.findall(r"sha256:([0-9a-f]{64})", match.group(3))))
    assert pins, f"{path.name} pins nothing"
    return pins


@pytest.fixture(scope="module")
def locks() -> dict[str, dict[str, tuple[str, set[str]]]]:
    return {name: parse_lock(REQ / name) for name in LOCKS}


def _covers(lock: dict, requirements: list[str], lock_name: str) -> None:
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11"}):
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"{lock_name} lacks {req.name} (pyproject: {line})"
        version = lock[name][0]
        assert req.specifier.contains(Version(version), prereleases=True), \
            f"{lock_name} pins {name}=={version}, outside pyproject's {line}"


def test_every_package_of_every_lock_is_pinned_with_hashes(locks):
    for name, pins in locks.items():
        for package, (version, hashes) in pins.items():
            assert hashes, f"{name}: {package}=={version} has no hash"


def test_the_parser_refuses_an_unhashed_pin(tmp_path):
    """The check above can fail: a freeze line without hashes, as the old locks had, is refused."""
    (tmp_path / "x.txt").write_text("pytest==9.2.0\n")
    with pytest.raises(AssertionError, match="not an exact pin with hashes"):
        parse_lock(tmp_path / "x.txt")


def test_the_runtime_lock_carries_no_test_tool(locks):
    runtime = locks["app.lock.txt"]
    extra = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    assert not extra & set(runtime), f"test packages in the runtime lock: {sorted(extra & set(runtime))}"
    tools = sorted(name for name in runtime if TEST_TOOLS.match(name))
    assert not tools, f"test tools in the runtime lock: {tools}"


def test_the_runtime_lock_covers_pyprojects_dependencies(locks):
    _covers(locks["app.lock.txt"], PYPROJECT["project"]["dependencies"], "app.lock.txt")


def test_the_test_lock_is_the_runtime_lock_plus_the_test_extra(locks):
    runtime, test = locks["app.lock.txt"], locks["test.lock.txt"]
    _covers(test, PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"],
            "test.lock.txt")
    assert set(runtime) <= set(test), f"missing from test.lock.txt: {sorted(set(runtime) - set(test))}"
    differ = sorted(name for name in runtime if runtime[name] != test[name])
    assert not differ, f"test.lock.txt pins these differently from app.lock.txt: {differ}"


def test_the_rasa_lock_covers_its_inputs(locks):
    inputs = [re.sub(r"\s+#.*", "", line).strip() for line in (REQ / "rasa.in").read_text().splitlines()]
    _covers(locks["rasa.lock.txt"], [line for line in inputs if line and not line.startswith("#")], "rasa.lock.txt")


def test_aiortc_and_av_are_held_to_the_versions_video_is_written_for(locks):
    """video/ reaches into aiortc internals (aiortc.codecs, aiortc.rtp) and PyAV's frame API."""
    deps = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    aiortc, av = deps["aiortc"].specifier, deps["av"].specifier
    assert aiortc.contains(locks["app.lock.txt"]["aiortc"][0]) and av.contains(locks["app.lock.txt"]["av"][0])
    assert not aiortc.contains("1.17.0") and not aiortc.contains("1.15.0")
    assert not av.contains("19.0.0")


def test_setup_installs_both_locks_and_the_image_the_runtime_lock_only_all_with_hashes():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    installs = [line for line in re.sub(r"\\\n\s*", " ", setup).splitlines() if "pip install" in line and " -r " in line]
    assert installs and all("--require-hashes" in line for line in installs), installs
    assert any("requirements/app.lock.txt" in line and "requirements/test.lock.txt" in line for line in installs)
    stamp = next(line for line in setup.splitlines() if line.startswith("APP_STAMP="))
    assert all(f"requirements/{name}" in stamp for name in ("app.lock.txt", "test.lock.txt", "models.lock.txt"))
    assert "requirements/rasa.lock.txt" in next(line for line in setup.splitlines() if line.startswith("RASA_STAMP="))
    docker = re.sub(r"\\\n\s*", " ", (REPO / "deploy" / "Dockerfile").read_text())
    installs = [line for line in docker.splitlines() if "pip install" in line and " -r " in line]
    assert installs and all("--require-hashes" in part for line in installs
                            for part in line.split("&&") if " -r " in part), installs
    assert "test.lock.txt" not in docker and "requirements/app.lock.txt" in docker
