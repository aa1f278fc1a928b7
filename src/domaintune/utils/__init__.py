"""Small helpers shared by every stage (no stage logic lives here)."""
