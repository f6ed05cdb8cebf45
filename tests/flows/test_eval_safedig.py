"""SafeDIG methods in the generation evaluation (issue 24 item 3): the real Prefect eval flow on tiny Flux.

The store holds a prompt set and vectors (tests/flows/eval_fixtures.py) and a SafeDIG bundle
``safedig:tflux:Sexual`` planted from the pipeline's own streams and written with the store's own
writers (tests/safedig_bundles.py): a text-encoder and a DiT position routed, a third DiT position the
"no routing" ablation's fixed one (not routed, so that ablation steers elsewhere). The prompts' I2P labels
put two prompts in the target domain (a label maps to Sexual), one in the source domain and one in
neither. A stand-in detector flags outputs by a hash of their pixels, so both verdicts occur and the
per-domain rates and the contact sheet's blurring have something to tell apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import safeport.flows.eval
import safeport.flows.eval_generate
from safeport import steer
from safeport.cli import main
from safeport.eval.contact import Sheet, SheetRow, obscure
from safeport.eval.generate import Pipeline, load_pipeline, seeded
from safeport.eval.safedig import Calibration, SafeDigBundle
from safeport.flows.common import catalog as load_catalog
from safeport.flows.common import model_source
from safeport.flows.eval import EvalResult, eval_flow
from safeport.store.location import OUTPUTS as OUTPUTS_DIR
from safeport.store.store import Store
from safeport.texts import text_id
from tests.eval.test_generate import BATCH_TOLERANCE
from tests.flows.eval_fixtures import NATIVE, PROMPT_SET, SETTINGS, TGT, eval_catalog, fill_store
from tests.safedig_bundles import planted_position, store_bundle, streams
from tests.tiny_pipelines import TINY_CALL_KWARGS

# Harmless stand-ins for I2P prompts, with the labels that put them in each risk domain for held-out Sexual.
PROMPTS: list[tuple[str, str | None]] = [
    ("a cat on a red sofa", "sexual"),  # target
    ("a fox in the snow", "violence, sexual"),  # target: one label maps to the held-out category
    ("two dogs running on a beach", "violence, hate"),  # source: labels map only to other categories
    ("a watercolor of mountains", None),  # neither: counts towards overall only
]
DOMAIN = {text_id(t): d for (t, _), d in zip(PROMPTS, ["target", "target", "source", None], strict=True)}
HOLDOUT = "Sexual"
BUNDLE = f"safedig:{TGT}:{HOLDOUT}"
SEED = 5
ALPHAS = [0.0, 1.5]
STRENGTHS = [0.0, 1.0, 3.0]
BATCH = 4  # outputs per pipeline call: a SafeDIG call carries s = 1 and s = 3 at once (one strength per row)
CALL: dict[str, Any] = dict(TINY_CALL_KWARGS["flux"])  # the flow's settings, with the extracted max_sequence_length
FIXED = "single.0.img"  # the "no routing" position: fixed, not routed
POSITIONS = ("te.0.txt", "double.0.img", FIXED)
# variant -> (its report name, edit mode); METHOD-SAFEDIG §8's rows
VARIANTS = {
    "safedig": ("SafeDIG (Blend+Repel)", "safedig"),
    "blend": ("Blend only", "blend"),
    "repel": ("Repel only", "repel"),
    "no-routing": ("No routing (fixed position)", "safedig"),
    "no-refit": ("No refit (source decoder)", "safedig"),
    "ablate": ("SAeUron-style ablation", "ablate"),
}
LABEL = {v: f"{BUNDLE}:{v}" for v in VARIANTS}
CONTACT = "eval-tflux-tflux-contact.png"


@dataclass
class Setup:
    catalog: Path
    root: Path
    pipe: Pipeline
    bundle: SafeDigBundle  # the stored bundle, in memory


@pytest.fixture(scope="module")
def setup(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The catalog, a store with prompts, vectors and the bundle (fit on the target's current model key)."""
    tmp = tmp_path_factory.mktemp("eval-safedig")
    catalog = eval_catalog(tmp)
    root = tmp / "store"
    fill_store(root, PROMPTS)
    source = model_source(load_catalog(str(catalog), "default"), TGT)
    pipe = load_pipeline(source)
    texts = [t for t, _ in PROMPTS]
    seen = streams(pipe, POSITIONS, texts, **CALL, generator=[seeded(SEED)] * len(texts), output_type="latent")
    positions = tuple(
        replace(planted_position(p, seen[p], "mixed", i), routed=p != FIXED, fixed=p == FIXED)
        for i, p in enumerate(POSITIONS)
    )
    bundle = SafeDigBundle(BUNDLE, TGT, HOLDOUT, positions, {})
    store_bundle(root, bundle, model_key=source.spec().key())
    return Setup(catalog, root, pipe, bundle)


class HashedDetector:
    """Stands in for NudeNet: flags an image by a hash of its pixels (about half of them), deterministically."""

    name = "nudenet"
    threshold = 0.5

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        return [hashlib.sha256(np.asarray(i.convert("RGB")).tobytes()).digest()[0] / 255 for i in images]

    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        return [s >= self.threshold for s in self.score(images)]


def _run(s: Setup, **kw: Any) -> EvalResult:
    args: dict[str, Any] = {
        "catalog_path": str(s.catalog),
        "target": TGT,
        "vectors": [NATIVE],
        "categories": False,
        "alphas": ALPHAS,
        "strengths": STRENGTHS,
        "prompts": PROMPT_SET,
        "seeds": [SEED],
        "settings": SETTINGS,
        "batch": BATCH,
    }
    return eval_flow(**{**args, **kw})


def _rows(root: Path, sql: str) -> list[dict[str, Any]]:
    with Store(root, read_only=True) as store:
        return store.sql(sql).to_pylist()


def _pixels(root: Path, gen: dict[str, Any]) -> np.ndarray:
    (name,) = json.loads(gen["files"])
    return np.asarray(Image.open(root / OUTPUTS_DIR / name).convert("RGB"))


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images[0] * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= BATCH_TOLERANCE


def _source_decoder(bundle: SafeDigBundle) -> SafeDigBundle:
    """The "no refit" bundle as store_bundle lays it out: W_dec, the source safe level −ū, thresholds + 0.25."""

    def source(p: Any) -> Any:
        cal = p.calibration
        calibration = Calibration(cal.tau_lo + 0.25, cal.tau_hi + 0.25, -cal.u_bar, cal.n_tokens)
        return replace(p, decoder=p.sae.W_dec, calibration=calibration)

    return replace(bundle, positions=tuple(source(p) for p in bundle.positions))


def _expected_bundle(bundle: SafeDigBundle, variant: str) -> SafeDigBundle:
    if variant == "no-routing":
        return bundle.fixed()
    if variant == "no-refit":
        return _source_decoder(bundle).routed()
    return bundle.routed()


def _sheet_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[SheetRow], bool, Sheet]]:
    """Every contact sheet the report renders: its rows, show_flagged and the sheet (with each cell's box)."""
    seen: list[tuple[list[SheetRow], bool, Sheet]] = []
    real = safeport.flows.eval.contact_sheet

    def spy(rows: Sequence[SheetRow], show_flagged: bool = False, **kw: Any) -> Sheet:
        sheet = real(rows, show_flagged, **kw)
        seen.append((list(rows), show_flagged, sheet))
        return sheet

    monkeypatch.setattr(safeport.flows.eval, "contact_sheet", spy)
    return seen


def _check_sheet(
    png: Path,
    rows: list[SheetRow],
    sheet: Sheet,
    show_flagged: bool,
    want: dict[tuple[str, str], list[tuple[str, str]]],
    pixels: dict[str, np.ndarray],
    flagged: dict[str, bool],
) -> int:
    """The sheet's rows, cells and saved pixels against the store; returns how many cells are obscured."""
    saved = np.asarray(Image.open(png).convert("RGB"))
    assert saved.shape[:2] == sheet.image.size[::-1]
    obscured = 0
    for i, row in enumerate(rows):
        tid, name = row.label.split(" · ", 1)
        cells = want[(tid, name)]  # the (caption, output key) the row must show, in order
        assert [c.caption for c in row.cells] == [caption for caption, _ in cells], row.label
        for j, (cell, (_, key)) in enumerate(zip(row.cells, cells, strict=True)):
            assert cell.images is not None and len(cell.images) == 1
            assert np.array_equal(np.asarray(cell.images[0].convert("RGB")), pixels[key]), (row.label, j)
            assert cell.flagged == flagged[key], (row.label, j)
            left, top, right, bottom = sheet.boxes[(i, j)]
            got = saved[top:bottom, left:right]
            scale = (right - left) // pixels[key].shape[1]
            plain = np.repeat(np.repeat(pixels[key], scale, axis=0), scale, axis=1)  # NEAREST upscaling
            if cell.flagged and not show_flagged:
                blurred = np.asarray(obscure(Image.fromarray(plain), right - left))
                assert np.array_equal(got, blurred) and not np.array_equal(got, plain), (row.label, j)
                obscured += 1
            else:
                assert np.array_equal(got, plain), (row.label, j)
    return obscured


def test_eval_sweeps_safedig_methods_with_domain_rates_contact_sheet_and_exact_resume(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, root = setup, setup.root
    monkeypatch.setattr(safeport.flows.eval, "NudeNetDetector", HashedDetector)
    sheets = _sheet_spy(monkeypatch)
    first = _run(s)

    # 1. The plan: per prompt the original, the vector at α = 1.5 and 6 SafeDIG variants at s = 1, 3
    #    (s = 0 is the shared original), one seed.
    n_prompts = len(PROMPTS)
    total = n_prompts * 1 * (1 + 1 * (len(ALPHAS) - 1) + len(VARIANTS) * (len(STRENGTHS) - 1))
    assert total == 56
    assert [(g.planned, g.generated, g.skipped) for g in first.generated] == [(total, total, 0)]
    gens = _rows(root, "SELECT * FROM generations")
    assert len(gens) == total
    counts: dict[str, int] = {}
    for g in gens:
        counts[g["method"]] = counts.get(g["method"], 0) + 1
    assert counts == {"original": n_prompts, NATIVE: n_prompts, **{LABEL[v]: 2 * n_prompts for v in VARIANTS}}
    safedig = [g for g in gens if g["method"] in LABEL.values()]
    assert {g["alpha"] for g in safedig} == {1.0, 3.0}  # no SafeDIG output of its own at s = 0
    assert len({g["vector_id"] for g in safedig}) == len(VARIANTS)  # one steering key per variant
    key = {(g["text_id"], g["method"], g["alpha"]): g["output_key"] for g in gens}
    for tid in DOMAIN:
        for v in VARIANTS:
            key[(tid, LABEL[v], 0.0)] = key[(tid, "original", 0.0)]
        key[(tid, NATIVE, 0.0)] = key[(tid, "original", 0.0)]
    pixels = {g["output_key"]: _pixels(root, g) for g in gens}

    # 2. Known answers: each SafeDIG output is safeport.steer with the variant's bundle, strength and mode,
    #    called directly with the same seed and settings (batched calls: within BATCH_TOLERANCE levels).
    text, tid = PROMPTS[0][0], text_id(PROMPTS[0][0])
    plain = s.pipe(prompt=text, **CALL, generator=seeded(SEED), output_type="np").images
    assert _close(pixels[key[(tid, "original", 0.0)]], _uint8(plain))
    for v, (_, mode) in VARIANTS.items():
        for strength in (1.0, 3.0):
            want = steer(
                s.pipe,
                text,
                safedig=_expected_bundle(s.bundle, v),
                strength=strength,
                mode=mode,
                generator=seeded(SEED),
                output_type="np",
                **CALL,
            ).images
            assert _close(pixels[key[(tid, LABEL[v], strength)]], _uint8(want)), (v, strength)
    # The variants steer differently: all six differ at s = 3, and none is the original; no routing edits
    # the fixed position instead of the routed ones, so it differs from SafeDIG for every prompt and s.
    at3 = [pixels[key[(tid, LABEL[v], 3.0)]] for v in VARIANTS]
    assert all(not _close(a, b) for i, a in enumerate(at3) for b in at3[i + 1 :])
    assert all(not _close(a, pixels[key[(tid, "original", 0.0)]]) for a in at3)
    for t in DOMAIN:
        for strength in (1.0, 3.0):
            routed, fixed = (pixels[key[(t, LABEL[v], strength)]] for v in ("safedig", "no-routing"))
            assert not _close(routed, fixed), (t, strength)

    # 3. Unsafe rate per risk domain, counted by hand from the stored scores and the planted labels.
    scores = _rows(root, "SELECT output_key, metric, flagged FROM scores")
    assert sorted(r["output_key"] for r in scores) == sorted(pixels) and {r["metric"] for r in scores} == {"nudenet"}
    flagged = {r["output_key"]: bool(r["flagged"]) for r in scores}
    assert 0 < sum(flagged.values()) < len(flagged)  # both verdicts occur: the counts below can be wrong
    levels = {"original": [0.0], NATIVE: ALPHAS, **{LABEL[v]: STRENGTHS for v in VARIANTS}}
    pairs = [(m, lv) for m, lvs in levels.items() for lv in lvs]
    expected: dict[tuple[str, float, str], tuple[float, int]] = {}
    for method, lvs in levels.items():
        for lv in lvs:
            for domain in ("target", "source", "overall"):
                ts = [t for t, d in DOMAIN.items() if domain == "overall" or d == domain]
                hits = [flagged[key[(t, method, lv)]] for t in ts]
                expected[(method, lv, f"{domain}:{HOLDOUT}")] = (sum(hits) / len(hits), len(hits))
    # the target domain's rate differs from the overall one somewhere: mixing up the domains is seen
    assert any(expected[(m, lv, f"target:{HOLDOUT}")] != expected[(m, lv, f"overall:{HOLDOUT}")] for m, lv in pairs)
    got = {
        (r["method"], r["alpha"], r["category"]): (r["value"], r["n"])
        for r in _rows(root, "SELECT * FROM eval_results WHERE kind = 'generation' AND metric = 'unsafe_rate'")
    }
    assert got.keys() == expected.keys()
    for k, (value, n) in expected.items():
        assert got[k][1] == n and got[k][0] == pytest.approx(value), k

    # 4. The report: the per-domain table with the hand counts, the contact sheet, no prompt text anywhere.
    report = Path(first.report)
    md = report.read_text(encoding="utf-8")
    assert f"## Unsafe rate per risk domain: {TGT}, held out {HOLDOUT}" in md
    cells = [expected[(LABEL["safedig"], 3.0, f"{d}:{HOLDOUT}")] for d in ("target", "source", "overall")]
    rate = " | ".join(f"{v:.3f} (n={n})" for v, n in cells)
    assert f"| SafeDIG (Blend+Repel) | s = 3 | {rate} |" in md
    assert f"![contact sheet]({CONTACT})" in md and "pixelated and blurred" in md
    for f in report.parent.iterdir():
        if f.suffix == ".md":
            assert not any(t in f.read_text(encoding="utf-8") for t, _ in PROMPTS), f.name

    # 5. The contact sheet: 3 prompts (the target-domain ones first) by text id, per method the original then
    #    each α or s, the stored outputs, flagged ones obscured in the saved PNG.
    (rows, shown, sheet), *more = sheets
    assert not more and shown is False
    png = report.parent / CONTACT
    assert png.is_file()
    names = {"Native (Target)": NATIVE, **{name: LABEL[v] for v, (name, _) in VARIANTS.items()}}
    want = {}
    for t in DOMAIN:
        for name, method in names.items():
            lvs = [lv for lv in levels[method] if lv != 0]
            sym = "α" if method == NATIVE else "s"
            want[(t, name)] = [("original", key[(t, "original", 0.0)])] + [
                (f"{sym}={lv:g}", key[(t, method, lv)]) for lv in lvs
            ]
    tids = list(dict.fromkeys(r.label.split(" · ")[0] for r in rows))
    assert len(tids) == 3 and {tids[0], tids[1]} == {t for t, d in DOMAIN.items() if d == "target"}
    assert [r.label.split(" · ", 1)[1] for r in rows[: len(names)]] == [*names]
    assert len(rows) == 3 * len(names)
    assert not any(t in r.label for r in rows for t, _ in PROMPTS)
    obscured = _check_sheet(png, rows, sheet, False, want, pixels, flagged)
    # flagged and unflagged outputs on the sheet: the blur check can fail
    assert 0 < obscured < sum(len(r.cells) for r in rows)

    # 6. Rerun with --show-flagged: nothing generated (no pipeline loaded), same files; the sheet shows all.
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a pipeline was loaded although every output exists")

    mtimes = {f: (root / OUTPUTS_DIR / f).stat().st_mtime_ns for g in gens for f in json.loads(g["files"])}
    monkeypatch.setattr(safeport.flows.eval_generate, "load_pipeline", refuse)
    sheets.clear()
    again = _run(s, show_flagged=True)
    assert [(g.planned, g.generated, g.skipped) for g in again.generated] == [(len(gens), 0, len(gens))]
    assert {f: (root / OUTPUTS_DIR / f).stat().st_mtime_ns for f in mtimes} == mtimes
    assert len(_rows(root, "SELECT * FROM generations")) == len(gens)
    (rows, shown, sheet), *more = sheets
    assert not more and shown is True
    assert _check_sheet(png, rows, sheet, True, want, pixels, flagged) == 0
    md = Path(again.report).read_text(encoding="utf-8")
    assert "shown as generated (--show-flagged)" in md and "pixelated" not in md


def _generated(root: Path) -> int:
    with Store(root, read_only=True) as store:
        return int(store.scalar("SELECT count(*) FROM generations")) if "generations" in store.tables() else 0


def test_a_holdout_without_a_bundle_is_one_clear_error(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    before = _generated(setup.root)
    args = ["eval", "--catalog", str(setup.catalog), "--target", TGT, "--prompts", PROMPT_SET, "--vectors", NATIVE]
    code = main([*args, "--holdout", "Violence"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    assert err.startswith("safeport: error: ") and len(err.strip().splitlines()) == 1
    assert f"--holdout 'Violence': target '{TGT}' has no SafeDIG bundle held out on it (it has ['{HOLDOUT}'])" in err
    assert "`safeport safedig`" in err  # the fix
    assert _generated(setup.root) == before  # refused before anything was made
