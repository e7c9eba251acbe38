"""What a run is asked to do: every command's settings, and the one resolver of ``auto``."""
