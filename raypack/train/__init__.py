"""How a step is taken: loss, engine, loop, launch."""
