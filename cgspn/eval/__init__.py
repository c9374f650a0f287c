"""Evaluation: one module per protocol over one shared feature extractor."""
