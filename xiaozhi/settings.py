"""Every setting of the assistant, in one place: read once from ``XIAOZHI_*`` environment variables.

Each field's default is the embedded, single-machine configuration; docs/configuration.md and the
README table are generated from the descriptions here (``xiaozhi settings --markdown``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XIAOZHI_", env_file=None, extra="ignore")

    # --- network -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the hub, Rasa and the action server listen on.")
    hub_port: int = Field(8000, description="Port of the FastAPI hub (chat page, API, /docs).")
    rasa_port: int = Field(5005, description="Port of the Rasa server.")
    actions_port: int = Field(5055, description="Port of the Rasa action server.")
    rasa_url: str | None = Field(
        None, description="URL of an external Rasa server; default http://{host}:{rasa_port}."
    )
    hub_url: str | None = Field(
        None, description="URL the action server uses to reach the hub; default http://{host}:{hub_port}."
    )
    rasa_token: SecretStr | None = Field(
        None, description="Token of Rasa's HTTP API; `xiaozhi run` makes a random one when unset."
    )
    rasa_timeout_s: float = Field(10.0, description="Seconds the hub waits for Rasa before degraded mode.")

    # --- storage -------------------------------------------------------------------------------
    var_dir: Path = Field(REPO_ROOT / "var", description="Directory for the SQLite database and logs.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL; default SQLite in var_dir. PostgreSQL: postgresql+asyncpg://...",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "xiaozhi",
        description="Cache shared by checkouts: embedding model, trained Rasa models, search indexes.",
    )

    # --- knowledge base ------------------------------------------------------------------------
    kb_backend: Literal["embedded", "elasticsearch"] = Field(
        "embedded", description="`embedded` (tantivy BM25 + exact kNN) or `elasticsearch` (production)."
    )
    kb_data_dir: Path = Field(REPO_ROOT / "knowledge_base" / "data", description="Knowledge-base data files.")
    embedding_model: str | None = Field(
        None,
        description="SentenceTransformer model path or name; default the offline e5-small built at setup.",
    )
    embedding_query_prefix: str = Field("query: ", description="Prefix e5-style models want on every text.")
    embedding_threads: int = Field(1, description="Torch threads for query embedding in the hub.")
    kb_abstain_threshold: float = Field(
        0.50, description="Below this confidence (0..1) the knowledge base abstains instead of answering."
    )
    kb_confidence_midpoint: float = Field(
        0.925, description="Dense similarity at which confidence is 0.5; fitted per embedding model (kb eval)."
    )
    kb_top_k: int = Field(5, description="How many ranked entries a search returns.")
    kb_reload_interval_s: float = Field(
        5.0, description="How often the hub checks for a re-indexed knowledge base (0: never)."
    )
    default_region: str = Field(
        "", description="GB/T 2260 code of the deployment's region (e.g. 330100 杭州); empty: national only."
    )
    es_url: str = Field("http://127.0.0.1:9200", description="Elasticsearch URL (kb_backend=elasticsearch).")
    es_username: str | None = Field(None, description="Elasticsearch user name.")
    es_password: SecretStr | None = Field(None, description="Elasticsearch password.")
    es_api_key: SecretStr | None = Field(None, description="Elasticsearch API key (instead of user/password).")
    es_ca_certs: Path | None = Field(None, description="CA bundle for the cluster's TLS certificate (e.g. http_ca.crt).")
    es_timeout_s: float = Field(10.0, description="Elasticsearch request timeout in seconds.")
    es_index: str = Field("xiaozhi-kb", description="Elasticsearch index alias the hub searches.")
    es_analyzer: str = Field(
        "cjk", description="Chinese analyser of the text fields: ik_max_word / smartcn in production."
    )

    # --- chat ----------------------------------------------------------------------------------
    max_message_chars: int = Field(1000, description="Longest resident message accepted, in characters.")
    max_body_bytes: int = Field(65536, description="Largest HTTP request body accepted.")

    # --- rasa ----------------------------------------------------------------------------------
    rasa_venv: Path = Field(REPO_ROOT / ".venv-rasa", description="Virtual environment holding Rasa 3.6.")
    rasa_startup_timeout_s: float = Field(
        300.0, description="Seconds `xiaozhi run` waits for Rasa to load its model (about 20 s on 2 cores)."
    )

    admin_username: str = Field("admin", description="User name of the admin account a new installation creates.")
    admin_password: SecretStr | None = Field(
        None,
        description="Password of that first admin account; unset: generated and written to var_dir/initial-admin-password.",
    )
    staff_session_hours: float = Field(12.0, description="Hours a staff login (agent, supervisor, admin) stays valid.")
    log_level: str = Field("INFO", description="Log level of the hub.")

    @property
    def effective_rasa_url(self) -> str:
        return (self.rasa_url or f"http://{self.host}:{self.rasa_port}").rstrip("/")

    @property
    def effective_hub_url(self) -> str:
        return (self.hub_url or f"http://{self.host}:{self.hub_port}").rstrip("/")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.var_dir / 'xiaozhi.db'}"

    @property
    def embedding_model_dir(self) -> Path:
        return self.cache_dir / "models" / "e5-small"

    @property
    def effective_embedding_model(self) -> str:
        return self.embedding_model or str(self.embedding_model_dir)

    @property
    def kb_index_dir(self) -> Path:
        return self.cache_dir / "kb-index"

    @property
    def rasa_models_dir(self) -> Path:
        return self.cache_dir / "rasa-models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
