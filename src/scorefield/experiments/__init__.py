"""Each paper result as a function that wires the library together and writes a run directory."""
