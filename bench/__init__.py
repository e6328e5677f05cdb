"""Benchmarks: each prints a table, writes JSON, and puts its ratio last."""
