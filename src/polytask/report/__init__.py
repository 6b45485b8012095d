"""Plots and run summaries (matplotlib is imported only when a figure is drawn)."""

from polytask.report.summary import fmt, metrics_table, write_summary

__all__ = ["fmt", "metrics_table", "write_summary"]
