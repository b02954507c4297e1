"""Analyses of denoisers and trajectories."""
