"""The C-GSPN library: models, teachers, losses, data. Imports kernels, never the orchestration packages."""
