"""Data flow: readers (real on-disk formats) -> preprocessing -> image cache -> batch stream
+ augmentation."""
