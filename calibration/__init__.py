"""Calibration: reference sets of known-good parts, thresholds and reports.

Runs on line PCs during product changeovers, so it uses only the runtime's
dependencies (no torch).
"""
