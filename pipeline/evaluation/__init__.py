"""Evaluation of token selection: metrics, the oracle, a frozen probe, reports, plots and the evaluation loops."""
