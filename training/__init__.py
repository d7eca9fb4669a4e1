"""Offline pipeline, by stage: `crm` (DIN + baselines), `llm` (stage-1/2 recipes, eval, export),
`llmsrec` (SASRec, LLM-SRec, ranking) and `study` (the quality study and its report). Shared by all:
`metrics`, `fewshot` (seeded rows); `cli` holds every command, `demo` the end-to-end build."""

__all__: list[str] = []
