"""The conventional CTR model: the DIN training recipe (`crm`) and its LR / rating-prior baselines.

Trained first and then frozen: its embeddings and hidden state feed the LLM stages (`training.llm`).
"""
