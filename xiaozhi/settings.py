"""Every setting of the assistant, in one place: read once from ``XIAOZHI_*`` environment variables.

Each field's default is the embedded, single-machine configuration; docs/configuration.md and the
README table are generated from the descriptions here (``xiaozhi settings --markdown``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from knowledge_base.config import ElasticsearchConfig, KnowledgeBaseConfig
from yibao_common.ports import parse_port_range

if TYPE_CHECKING:
    from video.ice import IceConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XIAOZHI_", env_file=None, extra="ignore")

    def __repr_args__(self):
        """Like pydantic's, but a password inside a URL setting (database, Redis, Elasticsearch) is ***."""
        from yibao_common.masking import mask_secrets

        for name, value in super().__repr_args__():
            yield name, mask_secrets(value) if isinstance(value, str) else value

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
        description="SQLAlchemy async URL; default SQLite in var_dir. PostgreSQL: postgresql+asyncpg://... "
        "(several hub replicas share it, and share live events through it: LISTEN/NOTIFY).",
    )
    db_migrate_on_start: bool = Field(
        True,
        description="Upgrade the database schema at start (replicas take turns: one migrates). false: the "
        "deploy runs `xiaozhi db upgrade` (a Job) and the hub refuses to start on a database not at its revision.",
    )
    idle_close_min: float = Field(
        30.0,
        description="A web chat nobody has written in for this many minutes is closed (the resident has "
        "left): it gets its follow-up survey and counts in analytics. One waiting for a person gets 4x as "
        "long; one an agent holds is never closed this way. 0: never.",
    )
    replica_url: str = Field(
        "",
        description="With several hub replicas: this replica's own address as the others reach it "
        "(http://<pod IP>:8000). A live video session or phone call is held by one replica; an agent's "
        "request for it that reaches another replica is forwarded there. \"auto\": this host's IP and hub port "
        "(containers). Empty: one hub.",
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
    embedding_tune: bool = Field(
        False,
        description="Fine-tune the default e5-small on the knowledge base's ways of asking at prepare time "
        "(knowledge_base/tuning.py; about 38 CPU-minutes and 3.7 GB) and use it. Off by default: measured "
        "in session 18, it lost abstain precision (0.93 -> 0.75) for +0.01 dev top-1, and a variant at half the "
        "steps and learning rate (session 19) lost it the same way for no dev gain (docs/retrieval-quality.md); "
        "it needs its own XIAOZHI_KB_CONFIDENCE_MIDPOINT and a refit.",
    )
    embedding_query_prefix: str = Field("query: ", description="Prefix e5-style models want on every text.")
    embedding_threads: int = Field(1, description="Inference threads for query embedding in the hub.")
    embedding_backend: Literal["auto", "onnx", "torch"] = Field(
        "auto",
        description="`onnx`: the model's onnxruntime export (written by `xiaozhi prepare`; same vectors, about "
        "half the CPU); `torch`: sentence-transformers; `auto`: the export when the model directory has a "
        "current one, else sentence-transformers (a hub model name).",
    )
    kb_abstain_threshold: float = Field(
        0.50, description="Below this confidence (0..1) the knowledge base abstains instead of answering."
    )
    kb_confidence_midpoint: float = Field(
        0.938, description="Dense similarity at which confidence is 0.5; fitted per embedding model (kb eval)."
    )
    kb_top_k: int = Field(5, description="How many ranked entries a search returns.")
    kb_reload_interval_s: float = Field(
        5.0, description="How often the hub checks for a re-indexed knowledge base (0: never)."
    )
    kb_expiry_warn_days: int = Field(
        60, ge=1, le=3650,
        description="The knowledge console reminds of records that expired or expire within this many days.",
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

    # --- abuse limits and security headers (issue 7) -------------------------------------------
    rate_limit_enabled: bool = Field(True, description="Per-client rate limits on public endpoints (429 when exceeded).")
    rate_limit_sessions: str = Field("20/minute", description="New chat sessions per client address (burst = count).")
    rate_limit_messages: str = Field(
        "30/minute", description="Resident messages per conversation, HTTP and WebSocket together."
    )
    rate_limit_kb_search: str = Field("120/minute", description="Knowledge-base searches per client address.")
    rate_limit_login: str = Field("10/minute", description="Staff login attempts per client address.")
    metrics_token: SecretStr | None = Field(
        None,
        description="When set, GET /metrics requires `Authorization: Bearer <token>` (Prometheus: "
        "`authorization: {credentials: ...}`); unset, /metrics is open to whoever can reach the hub.",
    )
    rate_limit_redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/2) for rate limits shared by every hub replica; unset: each "
        "replica limits on its own. If Redis stops answering, each replica limits on its own until it returns.",
    )
    rate_limit_exempt_networks: str = Field(
        "127.0.0.1/32,::1/128",
        description="Comma-separated CIDRs never rate-limited: the action servers and load balancer health checks.",
    )
    ws_max_frame_bytes: int = Field(16384, description="Largest WebSocket frame accepted; larger ones close the socket (1009).")
    frame_ancestors: str = Field(
        "'self'",
        description="CSP frame-ancestors of the hub's own pages: sources allowed to frame them "
        "(add the government sites that embed the widget's iframe).",
    )

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
    password_hash_concurrency: int = Field(
        1, ge=1, le=64,
        description="Password hashes/checks (argon2, ~0.1-0.25 CPU-s each, one core) run in worker threads, at most "
        "this many at a time; more logins wait their turn (the event loop never runs one). 1 leaves a 2-core "
        "machine a core for chat and calls under a login flood (docs/operations.md, Logins); raise it with more cores.",
    )

    # --- agent desk (issue 5) --------------------------------------------------------------------
    desk_service_hours: str = Field(
        "00:00-24:00",
        description="Local hours agents answer, comma-separated HH:MM-HH:MM ranges (e.g. 08:30-12:00,13:30-17:30); "
        "outside them a request for a person becomes a callback ticket.",
    )
    desk_service_days: str = Field(
        "1234567", description="ISO weekdays (1 = Monday) agents work, e.g. 12345; other days give callback tickets."
    )
    desk_timezone: str = Field("Asia/Shanghai", description="Time zone of the desk's service hours.")
    desk_callback_when_no_agent_online: bool = Field(
        False, description="Also turn requests into callback tickets when no agent has the console open."
    )
    desk_sla_warning_s: float = Field(60.0, description="Seconds a queue item may wait before the console flags it.")

    # --- web widget, follow-up surveys (issue 6) --------------------------------------------------
    widget_origins: str = Field(
        "",
        description="Comma-separated origins of host pages allowed to embed the web widget (CORS), "
        "e.g. https://ybj.hangzhou.gov.cn; `*` allows any; empty: same origin only.",
    )
    survey_delay_s: float = Field(600.0, description="Seconds after a conversation closes before its follow-up survey.")
    survey_max_attempts: int = Field(3, description="Phone follow-up attempts before a survey is given up.")
    survey_retry_s: float = Field(
        1800.0, description="Wait before the second phone attempt; doubles for each further one."
    )
    survey_quiet_hours: str = Field(
        "21:00-08:30", description="Local time (Asia/Shanghai) when no follow-up call is placed: HH:MM-HH:MM."
    )
    survey_expire_hours: float = Field(72.0, description="A survey nobody answered is closed after this many hours.")
    survey_sip_uri: str = Field(
        "",
        description="SIP URI the follow-up call goes to, e.g. sip:survey-{conversation_id}@10.0.0.5:5060: the hub "
        "keeps only masked numbers, so the trunk/PBX maps the reference to the caller; empty: no phone follow-up.",
    )
    survey_poll_interval_s: float = Field(30.0, description="How often the hub looks for due surveys (0: never).")
    log_level: str = Field("INFO", description="Log level of the hub.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`json`: one JSON object per line (time, level, logger, message, request_id, conversation_id, "
        "exception), masked like the text lines.",
    )

    # --- video help and the phone bridge (WebRTC) ----------------------------------------------
    ice_servers: str = Field(
        "[]",
        description='ICE servers for WebRTC as a JSON list, e.g. [{"urls": ["turn:turn.example.cn:3478"]}]; '
        "`[]`: host candidates only. Never a public default (docs/video.md).",
    )
    contact_hash_key: SecretStr | None = Field(
        None,
        description="Key of the keyed hash that recognises a returning caller (analytics' repeat contact) without "
        "storing the number. Set the same value on every hub replica and media worker; unset, each installation "
        "makes its own random key in var_dir/contact-hash.key and replicas do not recognise each other's callers.",
        min_length=32,
    )
    turn_secret: SecretStr | None = Field(
        None,
        description="coturn `static-auth-secret`: turn: servers without a username get time-limited credentials.",
    )
    turn_credential_ttl_s: int = Field(3600, description="Lifetime of generated TURN credentials, in seconds.")
    video_max_sessions: int = Field(6, description="Most simultaneous video/phone-bridge sessions; more are refused.")
    video_recording: bool = Field(
        True, description="Record video sessions (with the resident's consent) to var_dir/recordings/<conversation>/."
    )
    video_wait_timeout_s: float = Field(
        900.0, description="Seconds a resident waits in a video session for an agent before it is closed."
    )
    video_connect_timeout_s: float = Field(
        10.0, description="Seconds a WebRTC peer may take to connect before its session is closed (an offer that "
        "never connects holds a video slot this long; browsers connect in 1-2 s)."
    )
    video_max_sessions_per_client: int = Field(
        2, description="Most simultaneous video sessions one client address may hold (kiosks behind one NAT share it)."
    )
    video_capture: str = Field(
        "640x480@15",
        pattern=r"^\d{2,4}x\d{2,4}@\d{1,2}$",
        description="Camera picture the video pages ask for, WIDTHxHEIGHT@FPS; smaller fits more sessions per core.",
    )

    # --- phone hotline (issue 8) ---------------------------------------------------------------
    sip_enabled: bool = Field(
        True, description="Run the SIP endpoint of the phone hotline inside the hub (UDP on host:sip_port)."
    )
    sip_port: int = Field(5060, description="UDP port of the hotline's SIP endpoint.")
    sip_advertised_host: str | None = Field(
        None, description="Address put in SIP Contact/Via and SDP (public or PBX-facing IP); default: host."
    )
    sip_rtp_ports: str = Field(
        "10000-20000", description="RTP port range of phone calls, LOW-HIGH (open it in the firewall); empty or `auto`: any port."
    )
    sip_max_calls: int = Field(50, description="Most simultaneous phone calls; more get 486 Busy Here.")
    asr_kind: Literal["whisper", "vosk"] = Field(
        "whisper", description="Speech recogniser of the phone line: `whisper` (offline default) or `vosk` (production)."
    )
    asr_model_path: Path | None = Field(
        None, description="Recogniser model directory (vosk-model-cn-0.22 for vosk); whisper: the bundled base model."
    )
    asr_threads: int = Field(1, description="CPU threads of one speech-recognition decode (Whisper).")
    asr_workers: int = Field(
        2, description="Whisper decodes that run at once (model replicas); about one per core for the phone line."
    )
    asr_window: Literal["speech", "30s"] = Field(
        "speech",
        description="Whisper's encoder input: the turn plus 2 s (`speech`, ~4x faster) or padded to 30 s (`30s`).",
    )
    tts_kind: str = Field(
        "kokoro",
        description="Speech synthesiser of the phone line (telephony.tts registry): `kokoro` (Kokoro-82M, neural) "
        "or `pyttsx3` (espeak-ng; also the fallback when Kokoro cannot load).",
    )
    tts_voice: str = Field(
        "zf_xiaobei",
        description="Kokoro voice: `zf_xiaobei` (female), `zm_yunxi` (male), or the path of a kokoro-js voices/*.bin file.",
    )
    tts_speed: float = Field(
        1.0, ge=0.5, le=2.0, description="Kokoro speaking speed (0.85 in elderly mode unless set)."
    )
    tts_workers: int = Field(
        2, ge=1, description="Kokoro renders that run at once (threads, one core each); about one per core."
    )
    tts_prerender: bool = Field(
        True,
        description="Render the fixed prompts and every knowledge-base spoken answer in the background after "
        "start-up and each re-index (cached under cache_dir/tts), so callers hear them without waiting.",
    )
    recording_retention_days: float = Field(
        180.0,
        description="Call and video recordings older than this many days are deleted (checked hourly; 0: keep all). "
        "Set it from the agency's records policy.",
    )
    phone_recording: bool = Field(
        True,
        description="Record both legs of phone calls to var_dir/recordings (the greeting then says calls may be recorded).",
    )
    phone_elderly_mode: bool = Field(
        False, description="适老化: slower speech and more patience (longer end of turn, later re-prompts) on the hotline."
    )
    phone_end_of_turn_ms: int = Field(
        600, description="Silence that ends a caller's turn, in ms (1100 in elderly mode unless set)."
    )
    phone_early_asr_ms: int = Field(
        100,
        description="Silence after which recognition of a turn starts before the turn is over, in ms; a turn "
        "whose words are a complete question is then answered after 250 ms of silence instead of the full end "
        "of turn (600 in elderly mode unless set; 0: off).",
    )
    phone_no_input_s: float = Field(
        8.0, description="Seconds of caller silence after the bot spoke before a re-prompt (12 in elderly mode unless set)."
    )
    phone_asr_timeout_s: float = Field(
        10.0,
        ge=0,
        description="Seconds the speech recogniser may take for one caller turn; after that the call goes to the "
        "keypad menu as if the recogniser had crashed (0: no limit).",
    )
    phone_lines_file: Path = Field(
        REPO_ROOT / "telephony" / "district_lines.yaml",
        description="Former district numbers of the merged hotline and their GB/T 2260 region codes.",
    )
    phone_prompts_file: Path = Field(
        REPO_ROOT / "telephony" / "prompts.yaml",
        description="Fixed phone prompts (greeting, re-prompts, hold, keypad menu and its questions).",
    )

    @field_validator("sip_rtp_ports")
    @classmethod
    def _rtp_ports_parse(cls, value: str) -> str:
        parse_port_range(value)  # a bad range stops start-up with its reason, not a call later
        return value

    @property
    def rtp_port_range(self) -> tuple[int, int] | None:
        return parse_port_range(self.sip_rtp_ports)

    @property
    def effective_rasa_url(self) -> str:
        return (self.rasa_url or f"http://{self.host}:{self.rasa_port}").rstrip("/")

    @property
    def effective_hub_url(self) -> str:
        return (self.hub_url or f"http://{self.host}:{self.hub_port}").rstrip("/")

    @property
    def effective_replica_url(self) -> str:
        """``replica_url``; "auto": this host's address (a container's own IP) and the hub port."""
        if self.replica_url == "auto":
            import socket

            return f"http://{socket.gethostbyname(socket.gethostname())}:{self.hub_port}"
        return self.replica_url.rstrip("/")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.var_dir / 'xiaozhi.db'}"

    @property
    def embedding_model_dir(self) -> Path:
        return self.cache_dir / "models" / "e5-small"

    @property
    def embedding_tuned_dir(self) -> Path:
        return self.cache_dir / "models" / "e5-small-tuned"

    @property
    def effective_embedding_model(self) -> str:
        if self.embedding_model:
            return self.embedding_model
        return str(self.embedding_tuned_dir if self.embedding_tune else self.embedding_model_dir)

    @property
    def kb_index_dir(self) -> Path:
        return self.cache_dir / "kb-index"

    def knowledge_base_config(self) -> KnowledgeBaseConfig:
        """The knowledge base's own config (``knowledge_base.config``), the one place it is made from settings."""
        elasticsearch = ElasticsearchConfig(
            url=self.es_url,
            index=self.es_index,
            analyzer=self.es_analyzer,
            timeout_s=self.es_timeout_s,
            username=self.es_username,
            password=self.es_password.get_secret_value() if self.es_password is not None else None,
            api_key=self.es_api_key.get_secret_value() if self.es_api_key is not None else None,
            ca_certs=self.es_ca_certs,
        )
        return KnowledgeBaseConfig(
            data_dir=self.kb_data_dir,
            index_dir=self.kb_index_dir,
            embedding_model=self.effective_embedding_model,
            embedding_query_prefix=self.embedding_query_prefix,
            embedding_threads=self.embedding_threads,
            embedding_backend=self.embedding_backend,
            backend=self.kb_backend,
            abstain_threshold=self.kb_abstain_threshold,
            confidence_midpoint=self.kb_confidence_midpoint,
            top_k=self.kb_top_k,
            default_region=self.default_region,
            elasticsearch=elasticsearch if self.kb_backend == "elasticsearch" else None,
        )

    def ice_config(self) -> IceConfig:
        """Video's own config (``video.ice.IceConfig``; imported here, not at the top: video.ice loads aiortc)."""
        from video.ice import IceConfig

        return IceConfig(servers=self.ice_servers, turn_credential_ttl_s=self.turn_credential_ttl_s,
                         turn_secret=self.turn_secret.get_secret_value() if self.turn_secret else None)

    @property
    def rasa_models_dir(self) -> Path:
        return self.cache_dir / "rasa-models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
