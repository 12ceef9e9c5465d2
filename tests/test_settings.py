"""Settings come from XIAOZHI_* variables with documented defaults."""

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
    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`XIAOZHI_{name.upper()}`" in readme, name
