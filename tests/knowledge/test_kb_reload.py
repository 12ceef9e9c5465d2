"""A running hub picks up a re-indexed knowledge base without a restart."""

import shutil
import time

from fastapi.testclient import TestClient

from knowledge_base.factory import open_knowledge_base
from xiaozhi.hub.app import create_app

NEW_ENTRY = """
  - id: ev-reload-probe
    topic: e_voucher
    title: 医保电子凭证可以打印出来用吗
    questions: [医保码能不能打印成纸的, 医保电子凭证打印出来能用吗]
    spoken: 医保电子凭证是动态二维码，打印出来的不能用。
    answer: 医保电子凭证是实时刷新的动态二维码，截图或打印的纸质二维码不能用于结算。
    source: {title: 医保电子凭证使用说明, url: "https://www.nhsa.gov.cn/"}
    effective_date: 2024-01-01
"""


def test_hub_serves_a_new_entry_after_kb_index(settings, knowledge_base, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(settings.kb_data_dir / "national", data / "national")
    for path in (data / "national").rglob("*.yaml"):  # entries and their knowledge points (points/)
        if path.name not in ("e_voucher.yaml", "service_info.yaml"):
            path.unlink()
    local = settings.model_copy(
        update={
            "kb_data_dir": data,
            "cache_dir": tmp_path / "cache",
            "embedding_model": settings.effective_embedding_model,
            "var_dir": tmp_path / "var",
            "kb_reload_interval_s": 0.2,
        }
    )
    first = open_knowledge_base(local.knowledge_base_config(), embedder=knowledge_base.embedder)
    with TestClient(create_app(local, knowledge_base=first)) as hub:
        assert "ev-reload-probe" not in first.entries
        with open(data / "national" / "e_voucher.yaml", "a", encoding="utf-8") as f:
            f.write(NEW_ENTRY)
        # What `xiaozhi kb index` does: encode the changed corpus and mark it current.
        open_knowledge_base(local.knowledge_base_config(), embedder=knowledge_base.embedder)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = hub.get("/api/kb/entries/ev-reload-probe")
            if found.status_code == 200:
                break
            time.sleep(0.2)
        assert found.status_code == 200, "the hub did not reload the re-indexed knowledge base"
        best = hub.get("/api/kb/search", params={"q": "医保码打印出来能用吗"}).json()["results"][0]
        assert best["id"] == "ev-reload-probe"
