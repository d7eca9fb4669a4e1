"""The ReLLa / ReLLaX LLM pipeline: samples -> prompts (`data`), the shared loop and set-up, stage 1
(LoRA) and stage 2 (SPA + CFLoRA) recipes over reusable run folders (`runs`, torchrun in
`distributed`), `rellax eval` (`evaluate`) and the serving bundle (`export`, `tiny_bundle`).
"""
