"""What this machine can do: `domaintune doctor` and `domaintune estimate`."""
