"""DuckDB schema of a store: activation metadata, artefacts and their lineage."""

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
CREATE OR REPLACE VIEW activations AS
    SELECT m.name AS model, m.role, dt.dataset, dt.idx, dt.text_id, dt.split, dt.category, dt.pair_id,
           dt.side, a.n_tokens, a.truncated, a.unit_key, a.row, m.model_key, m.current
    FROM activation_rows a JOIN models m USING (model_key) JOIN dataset_texts dt USING (text_id);
CREATE OR REPLACE VIEW arrays AS
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
CREATE OR REPLACE VIEW lineage AS
    SELECT v.name AS vector, v.kind, v.source, v.target, v.mapper, v.category, m.params_json AS map_params,
           coalesce(v.lineage_json->>'$.split_hash', m.split_hash) AS split_hash, m.anchors,
           coalesce(v.lineage_json->>'$.anchors_hash', m.anchors_hash) AS anchors_hash,
           coalesce(v.lineage_json->>'$.input_units', m.input_units) AS input_units,
           coalesce(v.lineage_json->>'$.code_version', m.code_version) AS code_version, v.fit_key, v.vector_key,
           v.map_key, v.lineage_json->>'$.source_key' AS source_key, v.lineage_json->>'$.target_key' AS target_key,
           v.lineage_json->>'$.pairs_hash' AS pairs_hash, v.lineage_json->>'$.inputs' AS inputs
    FROM vectors v LEFT JOIN maps m USING (map_key);
"""
