"""Answer quality on real residents' questions: does the reply answer the question that was asked?

Sends every question of tests/data/answer_set.yaml through the hub's chat API with real Rasa (one
new session per question, as a resident who opens the chat and asks), scores each reply
(knowledge_base/answer_eval.py) and prints one table per split: the development split (what the
reranker was fitted on) and the held-out quarter (never tuned on).

    .venv/bin/python bench/answer_eval.py                 # starts `xiaozhi run` on free ports
    .venv/bin/python bench/answer_eval.py --url http://127.0.0.1:8000   # a running hub
    .venv/bin/python bench/answer_eval.py --direct        # the answer stage alone, no Rasa (seconds)

The deployment is Hangzhou's (XIAOZHI_DEFAULT_REGION=330100 unless set): a Guangzhou question must
get the national rule and a sentence that Guangzhou's rules decide, never Hangzhou's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from knowledge_base.answer_eval import load_items, score_reply, summarise, table  # noqa: E402

DEPLOYMENT_REGION = os.environ.setdefault("XIAOZHI_DEFAULT_REGION", "330100")


def direct_replies(items: list[dict]) -> list[dict]:
    from knowledge_base.answers import Context
    from knowledge_base.factory import open_knowledge_base
    from xiaozhi.settings import get_settings

    kb = open_knowledge_base(get_settings().knowledge_base_config())
    out = []
    for item in items:
        out.append(kb.answerer.answer(item["q"], Context(deployment_region=DEPLOYMENT_REGION)).as_dict())
    return out


async def hub_replies(url: str, items: list[dict], concurrency: int) -> list[dict]:
    import httpx

    replies: list[dict | None] = [None] * len(items)
    gate = asyncio.Semaphore(concurrency)

    async def ask(i: int, client: httpx.AsyncClient) -> None:
        async with gate:
            created = (await client.post("/api/sessions", json={})).json()
            auth = {"Authorization": f"Bearer {created['token']}"}
            r = await client.post(f"/api/sessions/{created['session_id']}/messages", json={"text": items[i]["q"]},
                                  headers=auth)
            if r.status_code != 200 or not r.json().get("replies"):
                replies[i] = {"outcome": "error", "text": f"{r.status_code} {r.text[:200]}"}
                return
            bot = r.json()["replies"]
            first = bot[0]
            meta = dict(first.get("meta") or {})
            # Several bot messages for one question (two answers, or an answer and a form's question):
            # the resident reads them all.
            meta["text"] = "\n".join(m.get("text") or "" for m in bot)
            meta["spoken"] = "".join((m.get("meta") or {}).get("spoken") or "" for m in bot)
            meta["steps"] = [s for m in bot for s in ((m.get("meta") or {}).get("steps") or [])]
            replies[i] = meta

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(ask(i, client) for i in range(len(items))))
    return [r or {"outcome": "error"} for r in replies]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running hub (default: start `xiaozhi run` on free ports)")
    parser.add_argument("--direct", action="store_true", help="the answer stage alone, without Rasa and the hub")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--failures", type=int, default=0, help="list this many wrong answers per split")
    parser.add_argument("--json", dest="json_out", help="write every scored reply here")
    args = parser.parse_args()

    items = load_items()
    started = time.perf_counter()
    proc = None
    if args.direct:
        replies = direct_replies(items)
        how = "answer stage directly (no Rasa)"
    else:
        url = args.url
        if url is None:
            from bench.chat_latency import start_stack  # noqa: PLC0415

            proc, url, cold, _log = start_stack()
            print(f"started xiaozhi run in {cold:.0f} s at {url}")
        try:
            replies = asyncio.run(hub_replies(url, items, args.concurrency))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
        how = f"hub chat API with Rasa ({url})"
    scored = [score_reply(item, reply) for item, reply in zip(items, replies)]
    splits = {name: [s for s in scored if s.item["split"] == name] for name in ("dev", "heldout")}
    print(f"answer quality, {len(items)} questions, {how}, deployment region {DEPLOYMENT_REGION}, "
          f"{time.perf_counter() - started:.0f} s\n")
    columns = {f"{name} ({len(rows)})": summarise(rows) for name, rows in splits.items()}
    # Messages retold in a resident's own voice from a described situation (wording: case) beside
    # those kept in the page's own wording: the stories are the harder half.
    for name, rows in splits.items():
        for wording, label in (("case", "story"), (None, "as written")):
            part = [s for s in rows if s.item.get("wording") == wording]
            if part:
                columns[f"{name} {label} ({len(part)})"] = summarise(part)
    print(table(columns))
    errors = sum(s.outcome == "error" for s in scored)
    if errors:
        print(f"\n{errors} request(s) failed")
    for name, rows in splits.items():
        wrong = [s for s in rows if s.point_ok is False][: args.failures]
        if wrong:
            print(f"\nwrong answers ({name}):")
        for s in wrong:
            got = s.answers[0]["unit"] if s.answers else s.outcome
            print(f"  {s.item['q'][:60]}  expect {s.item['expect'][:2]}  got {got}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            [{"q": s.item["q"], "split": s.item["split"], "outcome": s.outcome, "point_ok": s.point_ok,
              "topic_ok": s.topic_ok, "facts": [s.facts_found, s.facts_total], "wrong_region": s.wrong_region,
              "answers": s.answers, "text": s.reply_text} for s in scored], ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
