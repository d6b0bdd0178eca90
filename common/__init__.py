"""alcot.common: what every package uses: typed config building (``typed``) and file
helpers (``files``: atomic writes, checksums, JSONL reading). Imports no other alcot package."""
