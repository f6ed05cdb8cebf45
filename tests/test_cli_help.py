"""`safeport --help` reads as user text: what the tool does first, and one example per command."""

from __future__ import annotations

import argparse

import pytest

from safeport.cli import EXAMPLES, build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_top_level_help_starts_with_what_the_tool_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    usage, description = out.split("\n\n")[:2]
    assert usage == "usage: safeport COMMAND [options]"
    assert description.startswith("safeport learns a safety direction in a source LLM")
    for internal in ("``", "thin layer", "flows/", "store/"):  # not a module docstring
        assert internal not in description
    assert "safeport run " in out and "COMMAND --help" in out
    assert all(name in out for name in _commands())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_shows_one_example(name: str) -> None:
    text = _commands()[name].format_help()
    example = text.split("\nexample:\n", 1)[1].strip()
    assert example == EXAMPLES[name] and f"safeport {name}" in example


def test_every_example_parses() -> None:
    import shlex

    parser = build_parser()
    for name, example in EXAMPLES.items():
        words = shlex.split(example)
        words = words[words.index("safeport") + 1 :]
        assert parser.parse_args(words).command == name
