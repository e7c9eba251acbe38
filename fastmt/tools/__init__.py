"""Tools around the trainer: step benchmarks, memory, kernel checks, profiles, the ahead-of-time GPU build."""
