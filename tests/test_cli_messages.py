"""One CLI vocabulary: errors name the flags a user typed, and the same thing has the same flag everywhere."""
from __future__ import annotations

import argparse

import pytest

from scorefield.cli import build_parser, main
from scorefield.cli_messages import flag_names, in_cli_terms


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--patch")
    p.add_argument("--t-min", type=float)
    p.add_argument("--times")
    p.add_argument("--batch-size", type=int)
    return p


def test_flag_names_map_dests_to_long_flags():
    flags = flag_names(_parser())
    assert flags["t_min"] == "--t-min" and flags["times"] == "--times" and "help" not in flags


@pytest.mark.parametrize("message, expected", [
    ("patch_size is required: an odd int", "--patch is required: an odd int"),
    ("els: patch_size must be odd, got 4", "els: --patch must be odd, got 4"),
    ("t_min must lie in (0, 50)", "--t-min must lie in (0, 50)"),
    ("times [2.0] lie outside the grid", "--times [2.0] lie outside the grid"),
    # a plain word is only a keyword where it is the subject of the error
    ("the sampler times out", "the sampler times out"),
    # already named: left alone
    ("batch_size (--batch-size) must be ≥ 1", "batch_size (--batch-size) must be ≥ 1"),
    # part of a longer name, or quoted as an option key: left alone
    ("(alpha_bar_threshold, P) pairs", "(alpha_bar_threshold, P) pairs"),
    ("unknown option 't_min_x'", "unknown option 't_min_x'"),
])
def test_messages_name_the_flags(message, expected):
    assert in_cli_terms(message, _parser()) == expected


def test_without_a_parser_the_message_is_unchanged():
    assert in_cli_terms("t_min must be > 0", None) == "t_min must be > 0"


def test_cli_error_names_the_flag_not_the_keyword(capsys, tmp_path):
    code = main(["sample", "--model", "ls", "--data", "digits", "--subset", "20", "--n", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "--patch is required" in err and "patch_size" not in err


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    if command == "data":
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["info"]
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", ["sample", "train", "calibrate", "predict", "information", "criticality",
                                     "receptive-field", "data"])
def test_one_name_for_the_data_seed_and_loader_options(command):
    flags = _flags(command)
    assert "--data-seed" in flags and "--data-opt" in flags


@pytest.mark.parametrize("command", ["sample", "calibrate", "predict", "information", "criticality"])
def test_one_name_for_the_model_padding(command):
    assert "--padding" in _flags(command)


def test_data_info_takes_the_common_flags_and_the_former_ones(capsys):
    assert main(["data", "info", "grf", "--n", "3", "--size", "8", "--data-seed", "1",
                 "--data-opt", "exponent=1.5", "--json"]) == 0
    new = capsys.readouterr().out
    assert main(["data", "info", "grf", "--n", "3", "--size", "8", "--seed", "1", "-o", "exponent=1.5",
                 "--json"]) == 0
    assert capsys.readouterr().out == new
    assert main(["data", "info", "grf", "--n", "3", "--size", "8", "--data-seed", "2", "--json"]) == 0
    assert capsys.readouterr().out != new


def _commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


@pytest.mark.parametrize("command", _commands())
def test_help_reads_clean(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "%%" not in text and "usage: scorefield " + command in text
