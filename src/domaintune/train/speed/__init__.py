"""CPU speed levers of the train stage: each in its own module, switched on from one place."""
