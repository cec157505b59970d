"""Small shared helpers (atomic file writes, JSON)."""
from light_training.utils.files import atomic_path, load_json, save_json_atomic, to_jsonable

__all__ = ["atomic_path", "load_json", "save_json_atomic", "to_jsonable"]
