"""Error messages in the vocabulary of the command line.

The library's errors name its Python keywords (`patch_size`, `t_min`, `alpha_bars`), which is right for a
Python caller and wrong for someone who typed `scorefield sample --patch ...`: they should read the flag they
can change. `in_cli_terms` rewrites a message for one subcommand: each keyword becomes the flag that sets it
(taken from that subcommand's own parser, plus the few keywords whose flag has another name).
"""
from __future__ import annotations

import argparse
import re

# Python keywords whose CLI flag is not the keyword with dashes
KEYWORD_FLAGS = {
    "patch_size": "--patch",
    "patch_sizes": "--sizes",
}


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{dest: its first long flag} for every optional argument of `parser` (e.g. 't_min' -> '--t-min')."""
    flags: dict[str, str] = {}
    for action in parser._actions:            # argparse has no public accessor for a parser's actions
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and action.dest not in flags and action.dest != "help":
            flags[action.dest] = long[0]
    return flags


def _replace(message: str, keyword: str, flag: str, anywhere: bool) -> str:
    if flag in message:                       # the message already names the flag
        return message
    prefix = r"(?<![\w\-.'\"])" if anywhere else r"(?:^|(?<=: )|(?<=; ))"
    return re.sub(prefix + re.escape(keyword) + r"(?![\w\-=])", flag, message)


def in_cli_terms(message: str, parser: argparse.ArgumentParser | None) -> str:
    """`message` with the Python keywords of its command replaced by their flags.

    A keyword with an underscore is replaced wherever it stands as a word; a plain word ('times', 'steps') only
    at the start of the message or of a clause (after ': ' or '; '), where it is the subject of the error."""
    flags = dict(flag_names(parser)) if parser is not None else {}
    if parser is not None:
        usage = parser.format_usage()
        flags.update({k: v for k, v in KEYWORD_FLAGS.items() if re.search(re.escape(v) + r"(?![\w-])", usage)})
    for keyword in sorted(flags, key=len, reverse=True):
        message = _replace(message, keyword, flags[keyword], anywhere="_" in keyword)
    return message
