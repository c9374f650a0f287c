"""reports/REPORT.md: the sections built from the stages' metrics and the benchmark records."""
