"""Data flow: readers (real on-disk formats) -> preprocessing -> batch stream + augmentation."""
