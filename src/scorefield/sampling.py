"""Samplers with one signature, and the user-facing sample()."""
