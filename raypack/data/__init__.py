"""What goes in: formats, tokenization, packing, collation (pure core) and the Ray Data pipeline."""
