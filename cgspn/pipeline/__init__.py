"""The glue every stage shares: the stage CLI, params, errors, atomic outputs, MLflow tracking, the Ray
connection, the code closure, what a stage reads of earlier stages, and the names of stages and metric keys."""
