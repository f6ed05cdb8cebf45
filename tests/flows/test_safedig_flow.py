"""The user side of the SafeDIG fit (issue 23): ``safeport safedig``, its report and ``safeport safedig --plan``.

One tiny profile on real data: the real MiniLM text encoder (``te``) at its first three layers, the tiny catalog's
anchors as benign texts and SafeSteer pairs of three categories (the first 20 train and 4 test pairs of
each, from the shipped files), small SAEs (m = 2·d, k = 4, one epoch of 256-token batches), K = 2. The
command runs once for the module (capture, route, train, select, bundle, report); tests that write copy
its store. Known answers come from the store's rows and the shipped data, never from the printed text
alone.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from safeport.cli import main
from safeport.store.store import Store
from tests.conftest import REPO
from tests.flows.catalogs import tiny_catalog
from tests.tiny_models import minilm_folder

TE = "te"
POSITIONS = ["te.0.txt", "te.1.txt", "te.2.txt"]  # the forward stops after te.2
FIXED = "te.1.txt"  # the middle of the three: the no-routing position
CATEGORIES = ("Sexual", "Violence", "Hate")
N_PAIRS = {"train": 20, "test": 4}
SAE = {"expansion": 2, "k": 4, "epochs": 1, "batch_size": 256}


# --- the profile -------------------------------------------------------------------------------------


def _pair_files(tmp: Path) -> dict[str, Path]:
    """The first pairs of each category from the shipped SafeSteer files, one parquet per split."""
    out = {}
    for split, n in N_PAIRS.items():
        rows = pq.read_table(REPO / "data" / f"SafeSteer_{split}.parquet").to_pylist()
        kept = [r for c in CATEGORIES for r in [r for r in rows if r["category"] == c][:n]]
        path = tmp / f"pairs-{split}.parquet"
        pq.write_table(
            pa.Table.from_pylist([{k: r[k] for k in ("category", "safe_prompt", "unsafe_prompt")} for r in kept]), path
        )
        out[split] = path
    return out


def _catalog(tmp: Path) -> Path:
    models = {
        TE: {
            "role": "target",
            "family": "text_encoder",
            "path": str(minilm_folder()),
            "device": "cpu",
            "batch_size": 16,
            "max_tokens": 32,
        }
    }
    data = yaml.safe_load(tiny_catalog(tmp, anchors=32, extra_models=models).read_text())
    files = _pair_files(tmp)
    data["datasets"]["pairs"]["sources"] = [{"path": str(files[s]), "split": s} for s in N_PAIRS]
    profile = data["profiles"]["default"]
    profile.update(models=["src", TE], prompts=[], store=str(tmp / "store"))
    profile["safedig"] = {
        "models": [TE],
        "positions": {TE: POSITIONS},
        "datasets": ["anchors", "pairs"],
        "text_tokens": 8,
        "shard_texts": 64,
        "holdout": "Sexual",
        "route_k": 2,
        "harmful_latents": 4,
        "sae": SAE,
    }
    path = tmp / "safedig.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fitted(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(catalog, store, stdout) of one `safeport safedig` from an empty store (read-only: copy it to write)."""
    tmp = tmp_path_factory.mktemp("safedig")
    catalog = _catalog(tmp)
    code, out, err = _cli("safedig", "--catalog", str(catalog))
    assert code == 0, err
    return catalog, tmp / "store", out


def _copy(store: Path, to: Path) -> Path:
    shutil.copytree(store, to)
    return to


@pytest.fixture
def refuse_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading any model or training any SAE fails the test."""
    import safeport.eval.generate
    import safeport.extractors
    import safeport.flows.capture
    import safeport.flows.common
    import safeport.mappers.sae

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("a model was loaded or an SAE trained")

    monkeypatch.setattr(safeport.eval.generate, "load_pipeline", refuse)
    monkeypatch.setattr(safeport.flows.common, "extractor_for", refuse)
    monkeypatch.setattr(safeport.flows.capture, "extractor_for", refuse)  # bound at import
    monkeypatch.setattr(safeport.extractors, "load_extractor", refuse)
    monkeypatch.setattr(safeport.flows.common, "load_extractor", refuse)
    monkeypatch.setattr(safeport.mappers.sae, "train_sae", refuse)
    yield


def _bundle(store: Path, holdout: str) -> dict[str, Any]:
    """The bundle's positions with each SAE's, H's and refit's stored numbers."""
    from safeport.store import safedig as art

    with Store(store, read_only=True) as s:
        row = art.bundle_row(s, f"safedig:{TE}:{holdout}")
        routes = art.routes(s, row["route_key"])
        saes = {}
        for e in row["positions"]:
            sae = s.sql("SELECT * FROM saes WHERE sae_key = ?", [e["sae_key"]]).to_pylist()[0]
            refit = s.sql("SELECT * FROM refits WHERE refit_key = ?", [e["refit_key"]]).to_pylist()[0]
            h = s.scalar(
                "SELECT count(*) FROM sae_latents WHERE latents_key = ? AND in_h AND category IS NULL",
                [e["latents_key"]],
            )
            saes[e["position"]] = {**e, "sae": sae, "refit": refit, "h": int(h)}
    return {"row": row, "routes": routes, "saes": saes}


# --- safeport safedig ----------------------------------------------------------------------------------


def test_safedig_prints_routes_sae_quality_refit_h_and_the_report(fitted: tuple[Path, Path, str]) -> None:
    _, store, out = fitted
    b = _bundle(store, "Sexual")
    routed = [r["position"] for r in b["routes"] if r["routed"]]
    assert len(routed) == 2 and {r["position"] for r in b["routes"]} == set(POSITIONS)
    assert "te, held out Sexual (sources: Hate, Violence)" in out
    assert f"routed {', '.join(routed)}; no-routing position {FIXED}; bundle safedig:te:Sexual" in out
    assert set(b["saes"]) == {*routed, FIXED}
    lines = out.splitlines()
    for position, s in b["saes"].items():
        (line,) = [x for x in lines if x.split()[:1] == [position]]
        fields = line.split()
        sae, refit = s["sae"], s["refit"]
        grid = __import__("json").loads(refit["grid_json"])
        chosen = grid[f"fvu_k{int(refit['k']):+d}"]
        assert (
            f"{sae['fvu']:.3f} {sae['l0']:.2f} {sae['dead']:.3f} {s['h']} {refit['lam']:.4g} ({int(refit['k']):+d})"
            in (" ".join(fields))
        )
        assert fields[-2:] == [f"{chosen:.3f}", f"{refit['fvu_source']:.3f}"]
        role = ("routed" if position in routed else "") + (" + no routing" if position == FIXED else "")
        assert role.strip(" +") in line
    assert f"report {store / 'reports' / 'safedig-te.md'}" in out
    assert out.count("report ") == 1  # once per model


def test_the_report_shows_every_section_and_no_prompt_text(fitted: tuple[Path, Path, str]) -> None:
    _, store, _ = fitted
    folder = store / "reports"
    md = (folder / "safedig-te.md").read_text(encoding="utf-8")
    b = _bundle(store, "Sexual")
    assert "## Held out: Sexual" in md and "Sources: Hate, Violence." in md
    for r in b["routes"]:  # every candidate: rank, R_p, S_p, AUC per source category
        cells = [str(r["rank"]), f"`{r['position']}`", "yes" if r["routed"] else "", f"{r['robustness']:.3f}"]
        assert "| " + " | ".join(cells) + " | " in md
        assert " | ".join(f"{r['auc'][c]:.3f}" for c in ("Hate", "Violence")) + " |" in md
    for name in ["safedig-te-sexual-auc.png", "safedig-te-sexual-refit.png"] + [
        f"safedig-te-sexual-{p}-curves.png" for p in b["saes"]
    ]:
        assert f"]({name})" in md
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert md.count("◀ chosen") == len(b["saes"]) and md.count("no refit (source decoder)") == len(b["saes"])
    for s in b["saes"].values():
        assert f"`{s['position']}`: |H| = {s['h']}" in md
        assert f"| {s['sae']['fvu']:.3f} | {s['sae']['l0']:.2f} | {s['sae']['dead']:.3f} |" in md
    # Latent ids and numbers only: no text of any dataset, nor the start of one, is in the report. (Counts
    # only in the assertions: a failure must not print the texts either.)
    with Store(store, read_only=True) as s:
        texts = [t for (t,) in s.fetchall("SELECT text FROM texts")]
        n_data = s.scalar("SELECT count(DISTINCT text_id) FROM dataset_texts WHERE dataset IN ('anchors', 'pairs')")
    n_leaked = sum(1 for t in texts if t in md or (len(t) >= 24 and t[:24] in md))
    assert n_data == 32 + 2 * 3 * sum(N_PAIRS.values())  # every anchor and both sides of every pair ...
    assert len(texts) > n_data  # ... and the concept text
    assert n_leaked == 0


def test_a_second_run_trains_nothing_and_renders_nothing(
    fitted: tuple[Path, Path, str], tmp_path: Path, refuse_work: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safeport.flows.safedig_report

    catalog, store, first = fitted
    copy = _copy(store, tmp_path / "store")
    report = copy / "reports" / "safedig-te.md"
    before = report.stat().st_mtime_ns

    def no_render(*args: object, **kwargs: object) -> Any:
        raise AssertionError("the report was rendered again")

    monkeypatch.setattr(safeport.flows.safedig_report, "render", no_render)
    code, out, err = _cli("safedig", "--catalog", str(catalog), "--store", str(copy))
    assert code == 0, err
    assert report.stat().st_mtime_ns == before
    strip = lambda text: [x for x in text.splitlines() if not x.startswith(("safedig finished", "  report"))]  # noqa: E731
    assert strip(out) == strip(first)
    with Store(copy, read_only=True) as s:
        last = s.scalar("SELECT run_id FROM runs WHERE flow = 'safedig' ORDER BY started_at DESC LIMIT 1")
        tasks = s.fetchall("SELECT task, status FROM runs WHERE run_id = ? AND flow = 'safedig'", [last])
    assert {t for t, _ in tasks} == {"route", "train_sae", "select"} and {st for _, st in tasks} == {"skipped"}


def test_holdout_overrides_the_profile_and_refuses_unknown_categories(
    fitted: tuple[Path, Path, str], tmp_path: Path
) -> None:
    catalog, store, _ = fitted
    text = catalog.read_bytes()
    copy = _copy(store, tmp_path / "store")
    code, out, err = _cli("safedig", "--catalog", str(catalog), "--store", str(copy), "--holdout", "violence")
    assert code == 0, err
    assert catalog.read_bytes() == text  # the override never touches the catalog
    assert "te, held out Violence (sources: Hate, Sexual)" in out and "held out Sexual" not in out
    b = _bundle(copy, "Violence")
    assert all(set(r["auc"]) == {"Hate", "Sexual"} for r in b["routes"])
    assert b["row"]["lineage"]["sources"] == ["Hate", "Sexual"]
    assert _bundle(copy, "Sexual")["row"]["holdout"] == "Sexual"  # the profile's bundle is still there
    md = (copy / "reports" / "safedig-te.md").read_text(encoding="utf-8")
    assert "## Held out: Violence" in md and "## Held out: Sexual" not in md  # the report shows this run
    assert (copy / "reports" / "safedig-te-violence-auc.png").is_file()

    code, out, err = _cli("safedig", "--catalog", str(catalog), "--store", str(copy), "--holdout", "Nudity")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "--holdout 'Nudity' is not a SafeSteer category" in line
    assert "Sexual, Illegal activity, Violence, Humiliation, Hate, Disturbing, all" in line

    code, out, err = _cli("safedig", "--catalog", str(catalog), "--store", str(copy), "--holdout", "Disturbing")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "--holdout 'Disturbing' is not a category of the pairs (categories: ['Hate', 'Sexual', 'Violence'])" in line


# --- safeport safedig --plan -----------------------------------------------------------------------------


def _plan_rows(out: str, model: str) -> dict[str, list[str]]:
    """position -> its cells, from the table under ``model``."""
    lines = out.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(f"{model}: "))
    rows = {}
    for x in lines[start + 2 :]:
        if not x.startswith("  ") or x.startswith("  per held-out") or x.startswith("  over "):
            break
        cells = x.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_plan_loads_nothing_and_counts_the_store_or_estimates_from_the_capture_plan(
    fitted: tuple[Path, Path, str], tmp_path: Path, refuse_work: None
) -> None:
    catalog, store, _ = fitted
    code, out, err = _cli("safedig", "--catalog", str(catalog), "--plan")
    assert code == 0, err
    assert "rows from the store's committed rows" in out
    rows = _plan_rows(out, TE)
    assert list(rows) == POSITIONS
    b = _bundle(store, "Sexual")
    for position, s in b["saes"].items():  # exact: the SAE's own training tokens
        assert int(rows[position][2].replace(",", "")) == s["sae"]["n_train"]
    d, m = 384, 2 * 384
    assert rows["te.1.txt"][:2] == [f"{d}", f"{m}"]
    assert rows["te.1.txt"][7:9] == ["4.5", "MiB"]  # ZᵀZ: 8·m² bytes, float64
    assert "(6·d·m + 6·k·d) FLOPs / 30 TFLOP/s" in out and "8·m² B per accumulator" in out

    empty = tmp_path / "none"
    code, out, err = _cli("safedig", "--catalog", str(catalog), "--store", str(empty), "--plan")
    assert code == 0, err
    assert "rows from the capture plan (estimated)" in out and not empty.exists()
    estimated = _plan_rows(out, TE)
    for position, s in b["saes"].items():  # characters / 4 for token counts: close to the real rows
        assert abs(int(estimated[position][2].replace(",", "")) / s["sae"]["n_train"] - 1) < 0.1


def test_paper_plan_runs_offline_with_the_paper_widths(tmp_path: Path, refuse_work: None) -> None:
    code, out, err = _cli("safedig", "--profile", "paper", "--store", str(tmp_path / "none"), "--plan")
    assert code == 0, err
    flux, sd3 = _plan_rows(out, "flux1-dev"), _plan_rows(out, "sd35-large")
    assert flux["double.9.img"][:2] == ["3,072", "24,576"] and sd3["double.12.img"][:2] == ["2,432", "19,456"]
    assert flux["double.9.img"][7:9] == ["4.5", "GiB"]  # 8 · 24,576² bytes
    # Image positions: 64 tokens x 4 steps per text; benign captions and the non-Sexual train pairs, less the
    # SAE's held-out texts (ids ending in 0), one epoch.
    from safeport.datasets import build_all
    from safeport.flows.common import catalog

    data = build_all(catalog(None, "paper"))
    texts = {r.text_id for r in data["coco-captions-5k"].rows} | {
        r.text_id for r in data["safesteer-1k"].rows if r.split == "train" and r.category != "Sexual"
    }
    expected = 256 * sum(1 for t in texts if not t.endswith("0"))
    assert int(flux["double.9.img"][2].replace(",", "")) == expected
    assert "at most 4 SAEs" in out and "total: at most 8 SAEs" in out
