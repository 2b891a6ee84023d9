"""Chat-template tokenization with loss masks (pure core)."""

IGNORE_INDEX = -100
