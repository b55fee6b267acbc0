"""Every benchmark's logic, one module per bench: NAME.py's `main(argv=None)` parses the arguments,
runs and prints; bench/NAME.py only calls it. `common` is what they share (repetitions, peak memory,
`--json`); `throughput` also builds the training step the other step benches time."""
