"""Measuring adapters before shipping them. Today: latency on this machine (`deltatune bench`):
`settings.py` (what to measure), `latency.py` (measuring), `latency_report.py` (`measure_latency`, the report).
"""
