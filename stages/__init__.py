"""One module per DVC stage: `main(params, root, run)` over library code, and a thin CLI (cgspn.pipeline.cli)."""
