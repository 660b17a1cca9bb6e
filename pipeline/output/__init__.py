"""The on-disk contract of a compress output: row format, commit markers, manifest, garbage collection."""
