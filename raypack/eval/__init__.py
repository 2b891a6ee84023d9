"""What comes out: lm-evaluation-harness scores of trained checkpoints (`raypack eval`)."""
