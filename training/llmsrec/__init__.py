"""Ranking: SASRec (the collaborative teacher), LLM-SRec distilled from it over the frozen LLM, the
1-positive-vs-99 ranking protocol (`ranking`) and `rellax experiment ranking` (`ranking_eval`).
"""
