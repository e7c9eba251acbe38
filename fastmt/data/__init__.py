"""Data: readers (TSV/CSV/JSONL/parquet/hub), tokenization, batches, packed text for causal LMs."""
