"""Make the "database of the previous release" fixtures of tests/core/test_migrations.py (run from the repo root):

    .venv/bin/python scripts/make_previous_release_db.py [--release 65cad91]

The previous release's own code (``git archive`` of its xiaozhi/ package into a scratch directory, so this
needs the git history; the tests need only what it writes) creates the database the way that release did
at start (``Store.create_schema``: create_all and its additive upgrade, no schema version) and stores rows
through its own API: staff accounts, an audit entry, a login failure, a closed web conversation with a
resident question and an answer, a follow-up survey, a phone conversation waiting in the escalation queue.

Writes to tests/data/db/:
- release-<rev>.sqlite: the SQLite database file;
- release-<rev>.postgresql.sql: the same made on PostgreSQL (a throwaway cluster, tests/support/postgres.py), as a
  plain ``pg_dump --inserts`` script that psql loads into an empty database;
- release-<rev>.json: what was stored (ids, the conversation tokens, the staff passwords) for the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "db"

# Runs in a child process whose ``xiaozhi`` package is the previous release's.
CHILD = r'''
import asyncio, datetime as dt, json, pathlib, sys

import xiaozhi
assert pathlib.Path(xiaozhi.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()), xiaozhi.__file__
# The previous release's module paths (flat xiaozhi/hub/), not today's: this runs that release's code.
from xiaozhi.hub.accounts import Accounts, LoginFailure
from xiaozhi.hub.store import Store, utcnow
from xiaozhi.hub.surveys import Survey


async def main(url):
    store = Store(url)
    await store.create_schema()
    accounts = Accounts(store)
    await accounts.create_user("admin", "test-admin-password", "admin", display_name="管理员")
    await accounts.create_user("li.agent", "li-agent-password-123", "agent", display_name="李工",
                               skills=["cross_region"])
    await accounts.audit("cli", "user.create", "li.agent", {"role": "agent"})

    web, web_token = await store.create_conversation("web", "330100", entry_point="https://ybj.example.gov.cn/",
                                                     meta={"visitor": "v-0123456789abcdef"})
    question = await store.add_message(web.id, "resident", "异地就医怎么备案？")
    await store.add_messages(web.id, [("bot", "您可以在国家医保服务平台App上办理异地就医备案，备案后直接结算。",
                                       {"citations": ["cross_region.filing"]})],
                             reply_to=question.id, answered=question.id)
    await store.close_conversation(web.id)

    phone, phone_token = await store.create_conversation("phone", "330102", contact="138****5678",
                                                         entry_point="12393")
    await store.add_message(phone.id, "resident", "我要转人工")
    item = await store.add_escalation(phone.id, "phone", "requested", priority=2, topic="cross_region",
                                      summary={"want": "异地就医备案进度"})
    async with store.sessions() as s, s.begin():
        s.add(Survey(conversation_id=web.id, channel="web", region_code="330100", reason="resident_left",
                     status="answered", rating=5, comment="很清楚，谢谢", answered_via="chat",
                     answered_at=utcnow()))
        s.add(LoginFailure(username="admin", client="203.0.113.9", at=utcnow()))
    await store.close()
    print(json.dumps({
        "web": {"id": web.id, "token": web_token,
                "messages": ["异地就医怎么备案？", "您可以在国家医保服务平台App上办理异地就医备案，备案后直接结算。"]},
        "phone": {"id": phone.id, "token": phone_token, "escalation_id": item.id},
        "staff": {"admin": "test-admin-password", "li.agent": "li-agent-password-123"},
    }, ensure_ascii=False))


asyncio.run(main(sys.argv[1]))
'''


def run_old_release(code_dir: Path, url: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir), "XIAOZHI_VAR_DIR": str(code_dir / "var")}
    done = subprocess.run([sys.executable, "-c", CHILD, url], cwd=code_dir, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the previous release's code failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", default="65cad91", help="the last commit before schema migrations")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.support.postgres import postgres_cluster

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        code = Path(scratch) / "code"
        code.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.release, "xiaozhi"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)

        sqlite_file = OUT / f"release-{args.release}.sqlite"
        sqlite_file.unlink(missing_ok=True)
        made = {"sqlite": run_old_release(code, f"sqlite+aiosqlite:///{sqlite_file}")}
        for leftover in (sqlite_file.with_name(sqlite_file.name + "-wal"), sqlite_file.with_name(sqlite_file.name + "-shm")):
            assert not leftover.exists(), f"{leftover}: the database was not checkpointed"
        os.chmod(sqlite_file, 0o644)  # a fixture in the repo, not a live database

        with postgres_cluster() as cluster:
            url = cluster.create_database("previous_release")
            made["postgresql"] = run_old_release(code, url)
            dump = cluster.run("pg_dump", "--inserts", "--no-owner", "--no-privileges", "-h", "127.0.0.1",
                               "-p", str(cluster.port), "-U", cluster.user, "-d", "previous_release").stdout
        (OUT / f"release-{args.release}.postgresql.sql").write_text(dump, encoding="utf-8")
    made["release"] = args.release
    (OUT / f"release-{args.release}.json").write_text(json.dumps(made, ensure_ascii=False, indent=2) + "\n",
                                                       encoding="utf-8")
    print(f"wrote {sqlite_file.name}, release-{args.release}.postgresql.sql and release-{args.release}.json in {OUT}")


if __name__ == "__main__":
    main()
