"""The multimodal encoder service: a vision tower that turns images into embeddings for the
language model, with an embedding cache (EPD placements ED-P / E-P-D); see services/encoder/README.md."""
