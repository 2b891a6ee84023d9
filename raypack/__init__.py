"""raypack."""
