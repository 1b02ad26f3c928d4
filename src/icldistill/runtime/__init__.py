"""What every layer leans on: atomic result files and measurements (``records``), which process does
what under several processes (``distributed``), and the default data and cache locations (``paths``).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "distributed": (
        "launched", "num_processes", "process_index", "is_main", "barrier", "local_device",
        "shard_size", "shard", "split_step", "gather_rows", "broadcast", "sum_across", "shutdown",
    ),
    "paths": (
        "default_data_dir", "default_cache_dir",
    ),
    "records": (
        "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_jsonl",
        "read_json", "git_revision", "environment", "Measurement", "release_memory", "measure",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
