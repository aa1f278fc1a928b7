"""The data stage: raw business data to clean, split, accounted training sets."""
