"""Bridges from vtprune to other evaluation frameworks; each module imports its framework, an optional extra."""
