"""Subcommands of the `scorefield` CLI: one module each, exposing register(subparsers)."""
