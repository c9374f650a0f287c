"""Teachers: the registry and file format (registry.py), the offline defaults that ship in packages
(packaged.py, registered on import), hub loaders for timm and Hugging Face (hub.py)."""
from cgspn.teachers import packaged  # noqa: F401 (registers the offline defaults)
