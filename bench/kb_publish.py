"""Publishing a change to a 10,000-knowledge-point base: how long the re-index takes, and chat latency meanwhile.

What runs is the hub's own path (xiaozhi/hub/domain/knowledge_publish.py): the records in a database
(SQLite in a scratch directory), an edit of one figure as a draft, an admin's approval, then
``KnowledgePublisher.publish``: the published records read and validated into a corpus, the texts without a
vector encoded by the real e5 model, the BM25 index, the answer stage's unit index, and the swap. While it
runs, a "chat" thread asks the knowledge base questions through the answer stage (what the hub's chat and
the Rasa action's /api/kb/answer call) back to back, and every answer is timed.

The base: the packs' 152 entries and their knowledge points copied under new ids until there are
``--points`` of them, each copy's texts prefixed with a city name (distinct texts, as a real base has).
Encoding 70,000 new texts for the baseline would take an hour and measure nothing about publishing: the
baseline's vectors for a copied text are those of the text it copies (the published change itself is
encoded for real). The base is built once (the first generation), then ``--rounds`` publications of one
changed figure each are timed.

The build runs in the publisher's worker process, as in the hub (``--build thread``: in a thread of the
process that answers, as before; for comparison). As in a hub starting on this database, the published base
is first built in a thread (``catch_up(starting=True)``, timed), then the worker is warmed in the background
at the lowest priority while chat answers (both timed); the rounds are timed after, the first one included.
``--profile``: where the time of a chat answer goes on this base (cProfile of answers alone), and what a
publication costs the serving process (opening the files the worker wrote: how long, and the longest the GIL
was held in one go).

    flock /tmp/xiaozhi-heavy.lock .venv/bin/python bench/kb_publish.py [--points 10000] [--rounds 3] [--build thread] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import os
import pickle
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from knowledge_base.embedder import Embedder  # noqa: E402
from knowledge_base.factory import open_knowledge_base  # noqa: E402
from knowledge_base.records import pack_records  # noqa: E402
from knowledge_base.units import layout  # noqa: E402
from xiaozhi.hub import migrations  # noqa: E402
from xiaozhi.hub.domain.accounts import Role, StaffUser  # noqa: E402
from xiaozhi.hub.domain.knowledge_publish import KnowledgePublisher, paused  # noqa: E402
from xiaozhi.hub.domain.knowledge_store import KnowledgeStore  # noqa: E402
from xiaozhi.hub.infra.store import Store  # noqa: E402
from xiaozhi.settings import get_settings  # noqa: E402

CITIES = ["杭州", "宁波", "温州", "嘉兴", "湖州", "绍兴", "金华", "衢州", "舟山", "台州", "丽水", "南京", "苏州", "无锡",
          "合肥", "福州", "厦门", "南昌", "济南", "青岛", "郑州", "武汉", "长沙", "广州", "深圳"]
QUESTIONS = ["异地就医结算出了问题，打什么电话求助？", "医保电子凭证怎么激活", "住院报销需要什么材料", "异地就医怎么备案",
             "门诊慢特病怎么申请", "生孩子医保能报多少", "医保卡丢了怎么办", "居民医保断了再交要等多久"]
ADMIN = StaffUser(username="bench-admin", role=Role.admin.value, display_name="bench", password_hash="-")


def generated_points(points: list[dict], total: int) -> tuple[list[dict], dict[str, str]]:
    """``total`` points: the packs' own, then copies with city-prefixed texts; and copy text -> original text."""
    out = list(points)
    origin: dict[str, str] = {}
    n = 0
    while len(out) < total:
        city = CITIES[n // len(points) % len(CITIES)] + f"{n // (len(points) * len(CITIES)) or ''}"
        p = points[n % len(points)]
        copy = {**p, "id": f"{p['id']}.c{n}", "question": f"{city}：{p['question']}",
                "asks": [f"{city}：{a}" for a in p["asks"]], "answer": f"{city}：{p['answer']}"[:400]}
        for original, copied in [(p["question"], copy["question"]), (p["answer"], copy["answer"]),
                                 *zip(p["asks"], copy["asks"])]:
            origin[copied] = original
        out.append(copy)
        n += 1
    return out, origin


def chat_load(get_kb, stop: threading.Event, latencies: list[float]) -> None:
    from knowledge_base.answers import Context

    i = 0
    while not stop.is_set():
        question = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f"（{i}）")
        started = time.perf_counter()
        get_kb().answerer.answer(question, Context())
        latencies.append(time.perf_counter() - started)
        i += 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def report(name: str, values: list[float]) -> str:
    return f"{name}: {len(values)} answers, p50 {pct(values, .5) * 1000:.0f} ms, p95 {pct(values, .95) * 1000:.0f} ms"


async def chat_while(get_kb, work) -> tuple[object, list[float]]:
    """Run ``work`` (awaited) while a chat thread answers back to back; its result and the chat's latencies."""
    latencies: list[float] = []
    stop = threading.Event()
    chat = threading.Thread(target=chat_load, args=(get_kb, stop, latencies))
    chat.start()
    try:
        return await work, latencies
    finally:
        stop.set()
        chat.join()


def profile_answers(kb, n: int = 24) -> None:
    """Where an answer's time goes on this base: the answer stage's own functions, by cumulative time."""
    from knowledge_base.answers import Context

    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        kb.answerer.answer(QUESTIONS[i % len(QUESTIONS)] + f"（{i}）", Context())
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(28)
    print(f"\nprofile of {n} answers alone (cumulative seconds):")
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


def longest_hold(work, collections: list[float] | None = None) -> tuple[object, float, float]:
    """Run ``work()`` while a probe thread sleeps 1 ms at a time: the longest the probe waited past its sleep
    for the GIL (the longest a chat answer would be held up in one go), and how long ``work`` took.
    ``collections``: filled with how long each full (generation 2) garbage collection meanwhile took."""
    import gc

    gaps: list[float] = []
    stop = threading.Event()
    began: list[float] = []

    def timed(phase: str, info: dict) -> None:
        if info["generation"] == 2 and collections is not None:
            if phase == "start":
                began[:] = [time.perf_counter()]
            elif began:
                collections.append(time.perf_counter() - began[0])

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            time.sleep(0.001)
            gaps.append(time.perf_counter() - started - 0.001)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(0.05)
    gc.callbacks.append(timed)
    started = time.perf_counter()
    try:
        result = work()
    finally:
        took = time.perf_counter() - started
        gc.callbacks.remove(timed)
        stop.set()
        thread.join()
    return result, max(gaps), took


def serving_share(config, entries, points, stale_after_years: int, served) -> None:
    """What a publication costs the serving process: opening what the worker wrote (its vectors mapped, its
    tantivy index opened, the rest unpickled from a reader that hands the GIL over between frames); the build
    itself does not hold this process's GIL. Before this, the worker's result came through the pipe pickled
    (345 MB) and the tantivy index was rebuilt here: 2.3 s holding the GIL."""
    import datetime as dt

    from knowledge_base import build_worker

    units = served.answerer.units  # the served vectors: nothing is encoded again
    out = Path(tempfile.mkdtemp(prefix="kb-built-")) / "build"
    built = build_worker.build(config, entries, points, today=dt.date.today(), stale_after_years=stale_after_years,
                               seed=(list(units.layout.texts), units.vectors), out=out)
    sizes = {name.split("/")[0]: 0 for name in built["files"]}
    for name, size in built["files"].items():
        sizes[name.split("/")[0]] += size
    holds, took, collections = [], [], []
    for _ in range(3):
        # as the hub opens it: with the garbage collector paused, frozen after (xiaozhi/hub/infra/collector.py)
        opened, hold, seconds = longest_hold(lambda: paused(build_worker.load)(
            built, embedder=served.embedder, text=served.text, classifier=served.answerer.classifier), collections)
        opened.retire()  # frozen: freed only once its cycle is broken
        holds.append(hold)
        took.append(seconds)
    print(f"\nthe serving process's share of a publication: {len(pickle.dumps(built)) / 1e3:.1f} kB through the pipe; "
          f"files {', '.join(f'{k} {v / 1e6:.0f} MB' for k, v in sizes.items())}; opened in "
          f"{statistics.median(took):.2f} s median of 3, the GIL held at most {statistics.median(holds) * 1000:.0f} ms "
          f"in one go (median of 3 loads); full garbage collections meanwhile: {len(collections)}, "
          f"{', '.join(f'{c * 1000:.0f}' for c in collections) or '-'} ms")
    shutil.rmtree(out.parent, ignore_errors=True)


async def run(points_total: int, rounds: int, build: str = "process", profile: bool = False) -> None:
    settings = get_settings()
    scratch = Path(tempfile.mkdtemp(prefix="kb-publish-"))
    config = dataclasses.replace(settings.knowledge_base_config(), index_dir=scratch / "kb-index")
    entries, points, pack_corpus = pack_records(settings.kb_data_dir)
    all_points, origin = generated_points(points, points_total)
    print(f"base: {len(entries)} entries, {len(all_points)} knowledge points ({len(points)} from the packs)")

    embedder = Embedder.from_config(config)
    started = time.perf_counter()
    packs_kb = open_knowledge_base(dataclasses.replace(config, index_dir=settings.kb_index_dir), embedder=embedder)
    known = dict(zip(packs_kb.answerer.units.layout.texts, packs_kb.answerer.units.vectors))
    print(f"pack knowledge base opened in {time.perf_counter() - started:.1f} s")

    store = Store(f"sqlite+aiosqlite:///{scratch / 'hub.db'}")
    await migrations.prepare(store)
    records = KnowledgeStore(store)
    started = time.perf_counter()
    await records.import_packs(entries, all_points)
    print(f"imported into the database in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    corpus, _ = await records.served_corpus()
    stand_in = {t: known[origin.get(t, t)] for t in layout(corpus).texts if origin.get(t, t) in known}
    holder = {"kb": await asyncio.to_thread(open_knowledge_base, config, embedder=embedder, corpus=corpus,
                                            reuse=stand_in)}
    print(f"baseline generation built in {time.perf_counter() - started:.1f} s (a new text processor: as a hub's start "
          f"on this base cuts every text) "
          f"({len(layout(corpus).texts)} vector rows, {len(layout(corpus).texts) - len(stand_in)} encoded)")
    publisher = KnowledgePublisher(records, config, lambda: holder["kb"], lambda kb: holder.__setitem__("kb", kb),
                                   process_from=0 if build == "process" else None)
    print(f"building in a {'worker process' if build == 'process' else 'thread'}")
    get_kb = lambda: holder["kb"]  # noqa: E731
    await records.record_publication(ADMIN, corpus, "baseline")
    started = time.perf_counter()
    await publisher.catch_up(starting=True)  # a hub's start on this database: built in a thread, nothing served yet
    print(f"the start's path (catch_up(starting=True), in a thread; texts already cut by the baseline) took "
          f"{time.perf_counter() - started:.1f} s")
    if publisher._warming is not None:  # the worker warms in the background, at the lowest priority
        info, warming = await chat_while(get_kb, publisher.warmed())
        print(f"worker warmed in the background in {info['wall_s']:.1f} s (nice {info['niceness']}, "
              f"{info['texts']} texts, {info['cut']} cut, {info['encoded']} encoded); {report('chat meanwhile', warming)}")

    idle: list[float] = []
    stop = threading.Event()
    threading.Timer(10, stop.set).start()
    await asyncio.to_thread(chat_load, get_kb, stop, idle)
    print(report("chat alone", idle))
    if profile:
        profile_answers(holder["kb"])

    timings, during = [], []
    target = "cr-settlement-failed.hotline"
    served_figure = "12393"
    for r in range(rounds):
        row = await records.get("point", target)
        figure = f"1234{r + 5}"  # a new hotline number each round: 12345, 12346, ...
        doc = {**row.doc, "answer": row.doc["answer"].replace(served_figure, figure)}
        served_figure = figure
        await records.save(ADMIN, "point", doc, reason=f"bench round {r}")
        await records.transition(ADMIN, "point", target, "published")
        started = time.perf_counter()
        result, latencies = await chat_while(get_kb, publisher.publish(ADMIN, f"bench round {r}"))
        seconds = time.perf_counter() - started
        built = getattr(holder["kb"], "build_info", {})
        served = holder["kb"].answerer.answer("异地就医结算出了问题，打什么电话求助？")
        timings.append(seconds)
        during += latencies
        print(f"round {r + 1}: published generation {result['generation']} in {seconds:.1f} s; "
              f"chat meanwhile: {len(latencies)} answers, p50 {pct(latencies, .5) * 1000:.0f} ms, "
              f"p95 {pct(latencies, .95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
              f"new figure served: {figure in served.text}; the worker cut {built.get('cut', '-')} texts, "
              f"encoded {built.get('encoded', '-')}")
    await publisher.close()
    if profile:
        served_entries, served_points = await records.served()
        serving_share(config, served_entries, served_points, records.stale_after_years, holder["kb"])
    await store.close()
    shutil.rmtree(scratch, ignore_errors=True)  # the database and every generation's vectors: hundreds of MB
    print(f"\npublish (re-index + swap) of one change to {len(all_points)} points: median "
          f"{statistics.median(timings):.1f} s over {rounds} rounds (target < 60 s)")
    print(f"chat during publishing: p50 {pct(during, .5) * 1000:.0f} ms, p95 {pct(during, .95) * 1000:.0f} ms "
          f"over {len(during)} answers (target p95 < 500 ms); alone p95 {pct(idle, .95) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--build", choices=["process", "thread"], default="process",
                        help="where the publisher builds: its worker process (the hub's way) or a thread")
    parser.add_argument("--profile", action="store_true",
                        help="profile answers alone, and time the serving process's share of a publication")
    args = parser.parse_args()
    asyncio.run(run(args.points, args.rounds, args.build, args.profile))


if __name__ == "__main__":
    main()
