"""Gaussian (free-theory) denoisers: exact posterior means for Gaussian data."""
