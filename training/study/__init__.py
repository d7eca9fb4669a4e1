"""The quality study over the stages: `rellax experiment ml100k` (resumable steps), `tune` (recipe
trials under a time budget) and `report` (docs/results.md from their JSON files).
"""
