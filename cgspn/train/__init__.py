"""Training on Ray Train: the worker loop, the driver with its run key, and the export of a trained stage."""
