"""Calibration: every head scored with every score in one pass, plus measured (ablation) scores."""
