"""The netrpc benchmark suite; run it with ``bench/run``."""
