"""Split a checkpoint into one file per layer unit, and find a unit's file again."""
