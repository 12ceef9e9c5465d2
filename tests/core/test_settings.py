"""Settings come from XIAOZHI_* variables with documented defaults."""

import pytest
from pydantic import ValidationError

from xiaozhi.settings import Settings


def test_defaults_are_the_embedded_single_machine_setup(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("XIAOZHI_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.kb_backend == "embedded"
    assert s.effective_rasa_url == "http://127.0.0.1:5005"
    assert s.effective_database_url.startswith("sqlite+aiosqlite:///")
    assert s.effective_embedding_model.endswith("models/e5-small")
    assert Settings(embedding_tune=True).effective_embedding_model.endswith("models/e5-small-tuned")


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("XIAOZHI_HUB_PORT", "9100")
    monkeypatch.setenv("XIAOZHI_RASA_URL", "http://rasa.internal:5005/")
    monkeypatch.setenv("XIAOZHI_DATABASE_URL", "postgresql+asyncpg://u:p@db/xiaozhi")
    monkeypatch.setenv("XIAOZHI_KB_BACKEND", "elasticsearch")
    s = Settings()
    assert s.hub_port == 9100
    assert s.effective_rasa_url == "http://rasa.internal:5005"
    assert s.effective_database_url.startswith("postgresql+asyncpg://")
    assert s.kb_backend == "elasticsearch"


def test_every_setting_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_readme_documents_every_setting():
    from tests.support import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`XIAOZHI_{name.upper()}`" in readme, name


def test_rtp_port_range_is_checked_at_start_up():
    assert Settings(sip_rtp_ports="10000-20000").rtp_port_range == (10000, 20000)
    assert Settings(sip_rtp_ports="").rtp_port_range is None
    assert Settings(sip_rtp_ports="auto").rtp_port_range is None
    for bad in ("20000-10000", "10000", "abc-def", "80-90", "10001-10001", "10000-70000"):
        with pytest.raises(ValidationError, match="RTP port range"):
            Settings(sip_rtp_ports=bad)


def test_python_dash_m_xiaozhi_cli_knows_every_command():
    # `main()` once ran before the staff and db commands were defined: `python -m xiaozhi.cli db ...` said
    # "No such command" while the `xiaozhi` script (which imports the whole module first) worked.
    import subprocess
    import sys

    for group in ("db", "staff", "kb"):
        ran = subprocess.run([sys.executable, "-m", "xiaozhi.cli", group, "--help"], capture_output=True, text=True,
                             timeout=120)
        assert ran.returncode == 0, ran.stdout + ran.stderr


def test_the_knowledge_base_gets_its_own_config_made_from_the_settings_in_one_place(tmp_path):
    """knowledge_base imports nothing of the hub (issue 16): ``open_knowledge_base`` takes a
    ``KnowledgeBaseConfig``, which ``Settings.knowledge_base_config`` makes, secrets unwrapped there."""
    from knowledge_base.config import ElasticsearchConfig, KnowledgeBaseConfig
    from knowledge_base.factory import open_knowledge_base

    s = Settings(cache_dir=tmp_path, kb_top_k=7, kb_abstain_threshold=0.42, default_region="330100",
                 embedding_tune=True)
    config = s.knowledge_base_config()
    assert (config.data_dir, config.index_dir, config.top_k, config.abstain_threshold, config.default_region) == (
        s.kb_data_dir, tmp_path / "kb-index", 7, 0.42, "330100")
    assert config.embedding_model == str(tmp_path / "models" / "e5-small-tuned")
    assert config.backend == "embedded" and config.elasticsearch is None

    es = Settings(kb_backend="elasticsearch", es_url="https://es:9200", es_index="kb", es_username="kb",
                  es_password="s3cret", es_analyzer="ik_max_word").knowledge_base_config().elasticsearch
    assert es == ElasticsearchConfig(url="https://es:9200", index="kb", analyzer="ik_max_word", timeout_s=10.0,
                                     username="kb", password="s3cret")
    assert "s3cret" not in repr(es)

    with pytest.raises(TypeError, match="KnowledgeBaseConfig"):
        open_knowledge_base(s)  # the hub's Settings, as before: refused with the reason
    with pytest.raises(ValueError, match="backend must be one of"):
        KnowledgeBaseConfig(**{**config.__dict__, "backend": "solr"})
    with pytest.raises(ValueError, match="needs an ElasticsearchConfig"):
        KnowledgeBaseConfig(**{**config.__dict__, "backend": "elasticsearch"})
