"""How a step is taken: the run plan, loss, engine, loop, launch, and reading the run's logs back."""
