"""Analytic local score machines (IS, ES, LS, ELS, bbELS, two-state tanh, patch dictionary)."""
