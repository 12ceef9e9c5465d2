"""A running hub pre-renders the spoken answers a re-index adds (and the confirmation that names them,
issue 20), and a call then hears them from the cache, not from live synthesis (issue 15, part 5).

A knowledge base of two answers keeps the start-up pre-rendering short; the TTS cache is this
test's own (the Kokoro model is shared), so the new answer cannot already be in it from another run.
The caller's question is the hub's own voice saying it (Whisper follows Kokoro well: CER 0.12).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import yaml
from tests.support.phone import (
    conversations, needs_whisper, phone_hub, placed_call, transcript_then_hang_up, until_heard, until_quiet,
    wait_until,
)

from knowledge_base.factory import open_knowledge_base
from telephony.tts import CLAUSE_CACHE_NAME, split_clauses
from xiaozhi.hub.channels.phone.confirm import CONFIRM_SPOKEN
from yibao_common.spoken import spoken_chinese

pytestmark = [needs_whisper, pytest.mark.slow]

NEW_ENTRY = """
  - id: ev-print-probe
    topic: e_voucher
    title: 医保电子凭证可以打印出来用吗
    questions: [医保码能不能打印成纸的, 医保电子凭证打印出来能用吗]
    spoken: 医保电子凭证是实时刷新的二维码，打印出来的纸质码不能结算，请在手机上出示。
    answer: 医保电子凭证是实时刷新的动态二维码，截图或打印的纸质二维码不能用于结算，请在手机上打开出示。
    source: {title: 医保电子凭证使用说明, url: "https://www.nhsa.gov.cn/"}
    effective_date: 2024-01-01
"""
QUESTION = "医保电子凭证打印出来能用吗？"


async def test_a_reindexed_answer_is_prerendered_and_played_from_the_cache(settings, hub_settings, knowledge_base,
                                                                          tmp_path):
    source = yaml.safe_load((settings.kb_data_dir / "national" / "e_voucher.yaml").read_text(encoding="utf-8"))
    source["entries"] = source["entries"][:2]  # two answers: pre-rendered at start-up in about a minute
    kb_file = tmp_path / "data" / "national" / "e_voucher.yaml"
    kb_file.parent.mkdir(parents=True)
    kb_file.write_text(yaml.safe_dump(source, allow_unicode=True), encoding="utf-8")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(settings.cache_dir / "models")  # Kokoro, Whisper, the embedding model
    local = hub_settings.model_copy(update={"kb_data_dir": kb_file.parent.parent, "cache_dir": cache,
                                            "embedding_model": settings.effective_embedding_model})
    first = await asyncio.to_thread(open_knowledge_base, local.knowledge_base_config(), embedder=knowledge_base.embedder)
    async with phone_hub(local, first, tts_prerender=True, kb_reload_interval_s=0.2) as app:
        phone = app.state.phone
        prompts = phone.bot.prompts
        assert await asyncio.to_thread(phone.prerenderer.idle.wait, 600), "start-up pre-rendering finished"
        answer = split_clauses(spoken_chinese(NEW_ENTRY.split("spoken: ", 1)[1].split("\n", 1)[0]))
        # and the check of a heard question that names it: "我确认一下，您是想问…，对吗？"
        confirm = split_clauses(CONFIRM_SPOKEN.format(question="医保电子凭证可以打印出来用吗"))
        assert len(confirm) >= 2 and all(prompts.lookup(c, name=CLAUSE_CACHE_NAME) is None for c in confirm[1:])
        assert all(prompts.lookup(c, name=CLAUSE_CACHE_NAME) is None for c in answer)
        source["entries"] += yaml.safe_load(NEW_ENTRY)
        kb_file.write_text(yaml.safe_dump(source, allow_unicode=True), encoding="utf-8")
        # what `xiaozhi kb index` does: encode the changed corpus and mark it current
        await asyncio.to_thread(open_knowledge_base, local.knowledge_base_config(), embedder=knowledge_base.embedder)
        assert await wait_until(lambda: all(prompts.lookup(c, name=CLAUSE_CACHE_NAME) is not None for c in answer),
                              300), "the hub pre-rendered the new answer after the re-index"
        await asyncio.to_thread(phone.prerenderer.idle.wait, 300)
        assert all(prompts.lookup(c, name=CLAUSE_CACHE_NAME) is not None for c in confirm), \
            "the confirmation naming the new entry was pre-rendered too"
        assert await wait_until(lambda: "ev-print-probe" in app.state.knowledge_base.entries, 30)
        question = np.frombuffer(await asyncio.to_thread(phone.bot.synthesizer.synthesize, QUESTION), "<i2")
        async with placed_call(app) as (peer, call, rtp):
            await until_quiet(rtp)
            renders = prompts.renders
            asked = await rtp.say(question)
            assert await until_heard(rtp, asked), "the bot answered"
            await until_quiet(rtp)
            transcript = await transcript_then_hang_up(app, peer, call)
        live = prompts.renders - renders
        [conv] = await conversations(app)
    replies = [m.text for m in transcript if m.role == "bot"]
    print(f"\nheard {[m.text for m in transcript if m.role == 'resident']}, replied {replies[-1][:40]!r}; "
          f"clauses rendered live during the reply: {live}")
    assert "打印" in replies[-1] and "不能" in replies[-1], replies
    assert live == 0, "every clause of the reply came from the pre-rendered cache"
