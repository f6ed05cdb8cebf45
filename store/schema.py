"""DuckDB schema of a store and its versions: the tables as first released, then one step per change.

A new store runs :data:`SCHEMA` (version 1, as first released) and then every step of
:data:`MIGRATIONS`, exactly as an old store does, so there is one path to the current layout and
it is tested on every new store. Each step runs in its own write transaction together with the
version bump (see :meth:`safeport.store.store.Store._migrate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from safeport.store.claims import CLAIMS_DDL
from safeport.store.db import StoreError
from safeport.store.migrate import migrate as migrate_content_keys

log = logging.getLogger("safeport.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS models (
    model_key VARCHAR PRIMARY KEY, name VARCHAR, role VARCHAR, family VARCHAR, model_id VARCHAR,
    revision VARCHAR, weights VARCHAR, spec_json VARCHAR, dim INTEGER, registered_at TIMESTAMP,
    current BOOLEAN);
CREATE TABLE IF NOT EXISTS texts (text_id VARCHAR PRIMARY KEY, text VARCHAR, n_chars INTEGER);
CREATE TABLE IF NOT EXISTS datasets (
    dataset VARCHAR PRIMARY KEY, kind VARCHAR, content_hash VARCHAR, n_rows INTEGER,
    report_json VARCHAR, registered_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS dataset_texts (
    dataset VARCHAR, idx INTEGER, text_id VARCHAR, split VARCHAR, category VARCHAR,
    pair_id INTEGER, side VARCHAR, PRIMARY KEY (dataset, idx));
CREATE TABLE IF NOT EXISTS units (
    unit_key VARCHAR PRIMARY KEY, model_key VARCHAR, dataset VARCHAR, dataset_hash VARCHAR,
    array_path VARCHAR, n_rows INTEGER, dim INTEGER, dtype VARCHAR, shard_rows INTEGER,
    status VARCHAR, created_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS unit_texts (unit_key VARCHAR, row INTEGER, text_id VARCHAR,
    PRIMARY KEY (unit_key, row));
CREATE TABLE IF NOT EXISTS shards (
    unit_key VARCHAR, shard INTEGER, row_start INTEGER, row_stop INTEGER, checksum VARCHAR,
    tokens BIGINT, committed_at TIMESTAMP, PRIMARY KEY (unit_key, shard));
CREATE TABLE IF NOT EXISTS activation_rows (
    model_key VARCHAR, text_id VARCHAR, unit_key VARCHAR, row INTEGER, n_tokens INTEGER,
    truncated BOOLEAN, PRIMARY KEY (model_key, text_id));
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR, flow VARCHAR, task VARCHAR, model VARCHAR, dataset VARCHAR, unit_key VARCHAR,
    status VARCHAR, rows BIGINT, tokens BIGINT, seconds DOUBLE, started_at TIMESTAMP,
    finished_at TIMESTAMP, message VARCHAR);
CREATE VIEW IF NOT EXISTS activations AS
    SELECT m.name AS model, m.role, dt.dataset, dt.idx, dt.text_id, dt.split, dt.category, dt.pair_id,
           dt.side, a.n_tokens, a.truncated, a.unit_key, a.row, m.model_key, m.current
    FROM activation_rows a JOIN models m USING (model_key) JOIN dataset_texts dt USING (text_id);
CREATE VIEW IF NOT EXISTS arrays AS
    SELECT u.array_path AS path, u.unit_key, m.name AS model, u.dataset, u.n_rows, u.dim, u.dtype,
           u.status, count(s.shard) AS shards_committed,
           string_agg(s.checksum, ',' ORDER BY s.shard) AS checksums
    FROM units u LEFT JOIN models m USING (model_key) LEFT JOIN shards s USING (unit_key)
    GROUP BY ALL;

CREATE TABLE IF NOT EXISTS maps (
    map_key VARCHAR PRIMARY KEY, source VARCHAR, target VARCHAR, source_key VARCHAR, target_key VARCHAR,
    mapper VARCHAR, params_json VARCHAR, split_hash VARCHAR, anchors VARCHAR, anchors_hash VARCHAR,
    input_units VARCHAR, code_version VARCHAR, n_train INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS map_tensors (
    map_key VARCHAR, name VARCHAR, shape VARCHAR, dtype VARCHAR, checksum VARCHAR,
    PRIMARY KEY (map_key, name));
CREATE TABLE IF NOT EXISTS vectors (
    vector_key VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, source VARCHAR, target VARCHAR,
    mapper VARCHAR, category VARCHAR, map_key VARCHAR, fit_key VARCHAR, dim INTEGER, norm DOUBLE,
    checksum VARCHAR, lineage_json VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS eval_results (
    fit_key VARCHAR, kind VARCHAR, source VARCHAR, target VARCHAR, method VARCHAR, category VARCHAR,
    metric VARCHAR, alpha DOUBLE, value DOUBLE, n INTEGER, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS fits (
    fit_key VARCHAR PRIMARY KEY, source VARCHAR, target VARCHAR, status VARCHAR, inputs_json VARCHAR,
    report_path VARCHAR, created_at TIMESTAMP, finished_at TIMESTAMP, report_key VARCHAR, summary_json VARCHAR);
-- What each done fit produced (kind 'map' | 'vector'): a map or vector shared by several fits
-- (native:TARGET for two sources) is current while any current fit lists it.
CREATE TABLE IF NOT EXISTS fit_outputs (
    fit_key VARCHAR, kind VARCHAR, key VARCHAR, name VARCHAR, PRIMARY KEY (fit_key, kind, key));
-- Report rows of one prompt set for one fit (rows in eval_results under fit_key = report_key).
CREATE TABLE IF NOT EXISTS report_sets (
    report_key VARCHAR PRIMARY KEY, fit_key VARCHAR, source VARCHAR, target VARCHAR, prompt_set VARCHAR,
    prompt_hash VARCHAR, inputs_json VARCHAR, n_rows INTEGER, created_at TIMESTAMP);
CREATE VIEW IF NOT EXISTS lineage AS
    SELECT v.name AS vector, v.kind, v.source, v.target, v.mapper, v.category, m.params_json AS map_params,
           coalesce(v.lineage_json->>'$.split_hash', m.split_hash) AS split_hash, m.anchors,
           coalesce(v.lineage_json->>'$.anchors_hash', m.anchors_hash) AS anchors_hash,
           coalesce(v.lineage_json->>'$.input_units', m.input_units) AS input_units,
           coalesce(v.lineage_json->>'$.code_version', m.code_version) AS code_version, v.fit_key, v.vector_key,
           v.map_key, v.lineage_json->>'$.source_key' AS source_key, v.lineage_json->>'$.target_key' AS target_key,
           v.lineage_json->>'$.pairs_hash' AS pairs_hash, v.lineage_json->>'$.inputs' AS inputs
    FROM vectors v LEFT JOIN maps m USING (map_key);
"""


@dataclass(frozen=True)
class Migration:
    """One schema step: ``apply`` turns a store of version ``version - 1`` into ``version``.

    A step must be idempotent (``IF NOT EXISTS``, or check before changing): a crash leaves the
    store at the last finished step and the next writer resumes from there. To add one: write the
    function, append ``Migration(N + 1, "what it changes", fn)`` to :data:`MIGRATIONS`; every writer
    that opens an older store then migrates it, and readers of it meanwhile are told which version
    they found.
    """

    version: int
    what: str
    apply: Callable[[duckdb.DuckDBPyConnection], None]


# Work in progress, for `safeport status` and SQL: each running ``runs`` row with its writer.
# ``lease_alive`` is false once the writer stopped renewing (it died or hangs; see safeport.store.claims);
# ``total`` is what the work set out to compute (rows, outputs), NULL where it is not known up front.
RUNNING_VIEW = """
CREATE OR REPLACE VIEW running AS
    SELECT r.flow, r.task, r.model, r.dataset, r.unit_key AS work_key, r.rows, r.total, r.tokens, r.started_at,
           r.heartbeat_at, c.host, c.pid, r.run_id, coalesce(c.expires_at > epoch(now()), false) AS lease_alive
    FROM runs r LEFT JOIN claims c ON c.work_key = 'writer:' || r.owner
    WHERE r.status = 'running';
"""
RUNNING_VIEW_V2 = RUNNING_VIEW.replace(" r.total,", "")  # as schema step 2 made it (no runs.total yet)


def _v2_claims_and_progress(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(CLAIMS_DDL)
    for column, kind in (("owner", "VARCHAR"), ("heartbeat_at", "TIMESTAMP"), ("entry_id", "VARCHAR")):
        con.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {column} {kind}")
    con.execute(RUNNING_VIEW_V2)


def _v3_content_keys(con: duckdb.DuckDBPyConnection) -> None:
    for step in migrate_content_keys(con):
        log.info("migrated: %s", step)


def _v4_run_totals(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("ALTER TABLE runs ADD COLUMN IF NOT EXISTS total BIGINT")
    con.execute(RUNNING_VIEW)


# The row index of every unit (schema step 5). ``row`` indexes the array its shard names
# (``shards.array_path``): the unit's one array for units of layout ``array`` (pooled rows, one row
# per text, written in place), the shard's own array for layout ``shards`` (token rows, a shard's
# row count known only once it is computed). Coordinates are NULL for pooled rows. No primary key:
# a row is inserted only with its shard's commit record, which has one (``shards``), and an index
# over tens of millions of token rows would cost memory for nothing.
UNIT_ROWS_DDL = """
CREATE TABLE IF NOT EXISTS unit_rows (
    unit_key VARCHAR, shard INTEGER, row INTEGER, text_id VARCHAR, position VARCHAR, step SMALLINT,
    token INTEGER, stream VARCHAR, seed BIGINT, n_tokens INTEGER, truncated BOOLEAN);
"""

# Views over the row index. ``activation_rows`` keeps the columns the table of that name had
# (pooled rows, one per model and text) so queries written for older stores still answer.
ROW_VIEWS = """
CREATE OR REPLACE VIEW activation_rows AS
    SELECT u.model_key, r.text_id, r.unit_key, r.row, r.n_tokens, r.truncated
    FROM unit_rows r JOIN units u USING (unit_key) WHERE u.kind = 'pooled';
CREATE OR REPLACE VIEW activations AS
    SELECT m.name AS model, m.role, dt.dataset, dt.idx, dt.text_id, dt.split, dt.category, dt.pair_id,
           dt.side, a.n_tokens, a.truncated, a.unit_key, a.row, m.model_key, m.current
    FROM activation_rows a JOIN models m USING (model_key) JOIN dataset_texts dt USING (text_id);
CREATE OR REPLACE VIEW token_rows AS
    SELECT m.name AS model, u.dataset, r.position, r.step, r.token, r.stream, r.seed, r.text_id,
           t.split, t.category, t.pair_id, t.side, r.unit_key, r.shard, r.row, u.model_key, m.current
    FROM unit_rows r JOIN units u USING (unit_key) LEFT JOIN models m USING (model_key)
    LEFT JOIN (SELECT dataset, text_id, any_value(split) AS split, any_value(category) AS category,
                      any_value(pair_id) AS pair_id, any_value(side) AS side
               FROM dataset_texts GROUP BY ALL) t ON t.dataset = u.dataset AND t.text_id = r.text_id
    WHERE u.kind = 'tokens';
CREATE OR REPLACE VIEW arrays AS
    SELECT u.array_path AS path, u.unit_key, m.name AS model, u.dataset, u.kind, u.position, u.n_rows, u.dim,
           u.dtype, u.status, count(s.shard) AS shards_committed,
           string_agg(s.checksum, ',' ORDER BY s.shard) AS checksums
    FROM units u LEFT JOIN models m USING (model_key) LEFT JOIN shards s USING (unit_key)
    GROUP BY ALL;
"""


# Artefacts a rebuild marked stale (kept, never deleted); every store has the table, so
# `select * from stale` answers before the first rebuild too.
STALE_DDL = """
CREATE TABLE IF NOT EXISTS stale (
    kind VARCHAR, key VARCHAR, name VARCHAR, reason VARCHAR, marked_at TIMESTAMP, PRIMARY KEY (kind, key));
"""


def _table_type(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    row = con.execute("SELECT table_type FROM information_schema.tables WHERE table_name = ?", [name]).fetchall()
    return str(row[0][0]) if row else None


def _v5_general_units(con: duckdb.DuckDBPyConnection) -> None:
    """Units of any row shape: a row index with coordinates; pooled rows move into it, none recomputed."""
    for column, kind in (
        ("kind", "VARCHAR"),
        ("layout", "VARCHAR"),
        ("position", "VARCHAR"),
        ("spec_json", "VARCHAR"),
        ("n_texts", "INTEGER"),
        ("shard_texts", "INTEGER"),
    ):
        con.execute(f"ALTER TABLE units ADD COLUMN IF NOT EXISTS {column} {kind}")
    con.execute(
        "UPDATE units SET kind = coalesce(kind, 'pooled'), layout = coalesce(layout, 'array'), "
        "n_texts = coalesce(n_texts, n_rows), shard_texts = coalesce(shard_texts, shard_rows)"
    )
    for column, kind in (("array_path", "VARCHAR"), ("dtype", "VARCHAR")):
        con.execute(f"ALTER TABLE shards ADD COLUMN IF NOT EXISTS {column} {kind}")
    con.execute(
        "UPDATE shards SET array_path = coalesce(shards.array_path, u.array_path), "
        "dtype = coalesce(shards.dtype, 'float32') FROM units u WHERE u.unit_key = shards.unit_key"
    )
    con.execute(UNIT_ROWS_DDL)
    if _table_type(con, "activation_rows") == "BASE TABLE":
        con.execute(
            "INSERT INTO unit_rows SELECT a.unit_key, a.row // u.shard_rows, a.row, a.text_id, NULL, NULL, NULL, "
            "NULL, NULL, a.n_tokens, a.truncated FROM activation_rows a JOIN units u USING (unit_key)"
        )
        con.execute("DROP VIEW IF EXISTS activations")
        con.execute("DROP TABLE activation_rows")
    con.execute(ROW_VIEWS)
    con.execute(STALE_DDL)


# Position-aware steering artefacts (store/safedig.py reads and writes them).
SAFEDIG_DDL = """
CREATE TABLE IF NOT EXISTS routes (
    route_key VARCHAR, model VARCHAR, model_key VARCHAR, holdout VARCHAR, position VARCHAR, robustness DOUBLE,
    separability DOUBLE, auc_json VARCHAR, rank INTEGER, routed BOOLEAN, inputs_json VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (route_key, position));
CREATE TABLE IF NOT EXISTS saes (
    sae_key VARCHAR PRIMARY KEY, model VARCHAR, model_key VARCHAR, position VARCHAR, holdout VARCHAR, d INTEGER,
    m INTEGER, k INTEGER, c DOUBLE, fvu DOUBLE, l0 DOUBLE, dead DOUBLE, n_train BIGINT, n_heldout BIGINT,
    config_json VARCHAR, curves_json VARCHAR, lineage_json VARCHAR, checksums_json VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS sae_latents (
    latents_key VARCHAR, sae_key VARCHAR, position VARCHAR, category VARCHAR, latent INTEGER, score DOUBLE,
    mu_unsafe DOUBLE, mu_safe DOUBLE, fire_unsafe DOUBLE, fire_safe DOUBLE, in_h BOOLEAN, h_rank INTEGER);
CREATE TABLE IF NOT EXISTS refits (
    refit_key VARCHAR PRIMARY KEY, sae_key VARCHAR, holdout VARCHAR, lam DOUBLE, k DOUBLE, fvu DOUBLE,
    fvu_source DOUBLE, grid_json VARCHAR, n_train BIGINT, n_heldout BIGINT, checksums_json VARCHAR,
    lineage_json VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS steer_params (
    params_key VARCHAR PRIMARY KEY, sae_key VARCHAR, latents_key VARCHAR, refit_key VARCHAR, harmful_json VARCHAR,
    tau_lo DOUBLE, tau_hi DOUBLE, n_safe BIGINT, checksums_json VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS safedig_bundles (
    bundle_key VARCHAR PRIMARY KEY, name VARCHAR, model VARCHAR, model_key VARCHAR, holdout VARCHAR,
    route_key VARCHAR, positions_json VARCHAR, lineage_json VARCHAR, created_at TIMESTAMP);
"""


def _v6_safedig(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SAFEDIG_DDL)


# The views of the current schema, restated at every writer open of a current store (cheap, idempotent), so a
# view a release changes never depends on which step last touched it.
CURRENT_VIEWS = ROW_VIEWS + RUNNING_VIEW


MIGRATIONS: list[Migration] = [
    Migration(2, "claims table; runs.owner, runs.heartbeat_at, runs.entry_id (progress)", _v2_claims_and_progress),
    Migration(3, "dataset hashes from rows (rows-v1), fit report columns, fit_outputs backfilled", _v3_content_keys),
    Migration(4, "runs.total: what running work set out to compute (ETAs in status)", _v4_run_totals),
    Migration(5, "general units: unit_rows row index with coordinates, shard dtypes; stale table", _v5_general_units),
    Migration(6, "SafeDIG tables: routes, saes, sae_latents, refits, steer_params, safedig_bundles", _v6_safedig),
]
SCHEMA_VERSION = max(m.version for m in MIGRATIONS)  # version 1: SCHEMA as first released


def check_version(root: Path, con: duckdb.DuckDBPyConnection, writing: bool = False) -> int:
    """The store's schema version; a newer one, or (for readers) a migration in progress, is refused by name."""
    meta = dict(con.execute("SELECT key, value FROM meta WHERE key IN ('schema_version', 'migrating')").fetchall())
    raw = meta.get("schema_version", "1")
    try:
        version = int(raw)
    except ValueError:
        raise StoreError(
            f"store {root} records schema version {raw!r}, which is not a number; is it damaged?"
        ) from None
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store {root} has schema version {version}, written by a newer safeport; this one reads versions up to "
            f"{SCHEMA_VERSION}. Upgrade safeport to use this store"
        )
    if "migrating" in meta and not writing:
        raise StoreError(
            f"store {root} is being migrated (schema version {version} found; migration {meta['migrating']}); "
            "wait for it to finish and retry. If that process died, run any writing command (e.g. `safeport "
            "extract`) to finish the migration"
        )
    return version
