"""Benchmarks of the C-GSPN block and model against attention, and the bytes a block moves (counted)."""
