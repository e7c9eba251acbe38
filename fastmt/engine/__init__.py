"""The engine every task runs on: the loop, run state, optimizer, checkpoints, faults, stopping, files, processes."""
