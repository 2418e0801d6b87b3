"""The on-disk weights layout (layout.py), tiny random weights (tiny.py), upstream converter (convert.py)."""
