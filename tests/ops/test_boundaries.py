"""The packages keep their boundaries (docs/architecture.md#boundaries, issue 16).

- the import-linter contracts in pyproject.toml hold: layers (hub, phone | video, knowledge base,
  yibao_common), no library imports the hub, telephony uses only ``knowledge_base.text`` of the
  knowledge base, ``bot`` shares only yibao_common, no import circles inside a library;
- yibao_common is what both interpreters share, so it is imported here by the Rasa venv's Python 3.10
  in isolation (``-I -S``: no site-packages, nothing but a copy of the package on the path) and one
  call per module is run there;
- the action server's modules import in the Rasa venv with the environment the supervisor gives it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import grimp
import pytest

from tests.support import REPO

RASA_PYTHON = REPO / ".venv-rasa" / "bin" / "python"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
SHARED = REPO / "yibao_common"
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]


def lint_imports(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(LINT_IMPORTS), "--no-cache"] + ([str(config)] if config else [])
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd)})


def test_the_import_contracts_hold() -> None:
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert f"Contracts: {len(CONTRACTS['contracts'])} kept, 0 broken." in run.stdout, run.stdout[-3000:]


def _contracts_toml() -> str:
    """The [tool.importlinter] part of pyproject.toml, as its own file."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    start = re.search(r"^\[tool\.importlinter\]$", text, re.M).start()
    rest = re.search(r"^\[(?!\[?tool\.importlinter)", text[start + 1:], re.M)
    return text[start:start + 1 + rest.start()] if rest else text[start:]


@pytest.mark.parametrize("module, source, broken", [
    ("knowledge_base/factory.py", "from xiaozhi.settings import Settings\n", "Libraries import nothing of the hub"),
    ("telephony/tts.py", "from xiaozhi.spoken import speech_text\n", "Layers"),
    ("telephony/asr.py", "from knowledge_base.search import KnowledgeBase\n", "The phone line uses"),
    ("bot/actions.py", "from knowledge_base.places import REGION_CODES\n", "The Rasa venv's code (bot)"),
    ("yibao_common/places.py", "import knowledge_base.text\n", "Layers"),
    ("telephony/outbound.py", "from telephony.user_agent import UserAgent\n", "No import circles"),
])
def test_the_contracts_catch_what_issue_16_found(tmp_path: Path, module: str, source: str, broken: str) -> None:
    """The imports issue 16 listed, each put back into a tree of empty packages: its contract breaks."""
    for package in CONTRACTS["root_packages"]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for path in ("xiaozhi/settings.py", "xiaozhi/spoken.py", "knowledge_base/text.py", "knowledge_base/search.py",
                 "knowledge_base/places.py", "telephony/asr.py", "telephony/tts.py", "telephony/outbound.py",
                 "yibao_common/places.py", "knowledge_base/factory.py", "bot/actions.py"):
        (tmp_path / path).write_text("")
    (tmp_path / "telephony" / "user_agent.py").write_text("from telephony.outbound import *\n")
    (tmp_path / "telephony" / "asr.py").write_text("from knowledge_base.text import *\n")  # the one allowed
    config = tmp_path / "contracts.toml"
    config.write_text(_contracts_toml())
    assert lint_imports(tmp_path, config).returncode == 0  # the empty tree keeps every contract

    (tmp_path / module).write_text((tmp_path / module).read_text() + source)
    run = lint_imports(tmp_path, config)
    assert run.returncode != 0, run.stdout[-3000:]
    [name] = [c["name"] for c in CONTRACTS["contracts"] if c["name"].startswith(broken)]
    report = " ".join(run.stdout.split())  # the report wraps long contract names
    assert f"{name} BROKEN" in report, run.stdout[-3000:]


def test_yibao_common_imports_only_the_standard_library() -> None:
    """What the package's modules import from outside it, read from the source (import-linter's grimp)."""
    graph = grimp.build_graph("yibao_common", include_external_packages=True)
    outside = {imported for module in graph.modules if module.startswith("yibao_common")
               for imported in graph.find_modules_directly_imported_by(module)
               if not imported.startswith("yibao_common")}
    assert outside, "the graph found no imports at all: the check would pass on anything"
    assert {m.split(".")[0] for m in outside} <= set(sys.stdlib_module_names), outside


# One call per module, in the other interpreter; a new module must add its own.
SHARED_CALLS = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [sys.argv[1]]
    from yibao_common import masking, places, ports, spoken
    import logging
    record = logging.makeLogRecord({"msg": "来电 %s", "args": ("13812345678",)})
    masking.MaskingFilter().filter(record)
    out = {
        "version": list(sys.version_info[:2]),
        "spoken": spoken.spoken_chinese("报销70%，最多30000元，热线12393"),
        "masking": [masking.mask_pii("身份证110101199003074514"), record.msg,
                    masking.mask_log_text("/api?token=abc&q=%E6%89%8B%E6%9C%BA13812345678")],
        "places": [places.find_place("我在东营住院", []), places.same_province("330100", "330200"),
                   places.CODE_NAMES["330100"]],
        "ports": ports.parse_port_range("10000-20000"),
        "third_party": sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)
                              - {"yibao_common", "__main__"}),
    }
    print(json.dumps(out, ensure_ascii=False))
""")


def test_yibao_common_runs_alone_on_the_rasa_venvs_python_3_10(tmp_path: Path) -> None:
    modules = {p.stem for p in SHARED.glob("*.py") if p.stem != "__init__"}
    called = set(re.findall(r"\b(masking|places|ports|spoken)\.", SHARED_CALLS))
    assert modules == called, f"every module of yibao_common gets one call here: add {modules - called}"
    copy = tmp_path / "lib"
    shutil.copytree(SHARED, copy / "yibao_common", ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([str(RASA_PYTHON), "-I", "-S", "-c", SHARED_CALLS, str(copy)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["version"] == [3, 10]
    assert out["spoken"] == "报销百分之七十，最多三万元，热线幺二三九三"
    assert out["masking"] == ["身份证110101********4514", "来电 138****5678",
                              "/api?token=***&q=%E6%89%8B%E6%9C%BA138****5678"]
    assert out["places"] == [["东营", "370500"], True, "杭州"]
    assert out["ports"] == [10000, 20000]
    assert out["third_party"] == []


def test_the_action_server_imports_in_the_rasa_venv_as_the_supervisor_starts_it() -> None:
    from xiaozhi.rasa_model import rasa_environment
    from xiaozhi.settings import Settings

    modules = sorted(f"bot.actions.{p.stem}" for p in (REPO / "bot" / "actions").glob("*.py") if p.stem != "__init__")
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
    run = subprocess.run([str(RASA_PYTHON), "-c", code, *modules], cwd=REPO, env=rasa_environment(Settings()),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
