"""`safeport catalog --profile paper` reads the paper's counts (issue 16 item 7); the default profile is unchanged."""

from __future__ import annotations

import re

import pytest

from safeport.cli import build_parser


def _catalog_rows(profile: str, capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    """{dataset: rows} as the real `safeport catalog --profile PROFILE` prints them."""
    args = build_parser().parse_args(["catalog", "--profile", profile])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    return {m[1]: int(m[2]) for m in re.finditer(r"dataset (\S+)\s+\w+\s+(\d+) rows", out)}


def test_paper_profile_has_enough_anchors(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _catalog_rows("paper", capsys)
    assert rows["anchors-27k"] >= 26_500
    assert rows["i2p"] > 4_000 and rows["coco-captions-300"] == 300


def test_paper_profile_uses_1000_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    assert _catalog_rows("paper", capsys)["safesteer-1k"] == 2_000  # 1,000 pairs, two texts each


def test_default_profile_counts_are_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _catalog_rows("default", capsys)
    cross_model = {"safesteer": 4_600, "anchors-3k": 2_992, "i2p-sample": 600}
    safedig = {"coco-captions-1k": 1_000, "safesteer-1k": 2_000, "coco-captions-300": 300}  # cache + headline
    assert rows == {**cross_model, **safedig}
