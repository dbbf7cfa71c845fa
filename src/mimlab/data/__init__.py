"""Built-in formula-driven image datasets (fractals, dead leaves, fractal-leaves): see `mimlab.data.synthetic`."""
