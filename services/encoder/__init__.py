"""The multimodal encoder service (not built yet): a vision tower that turns images into
embeddings for the language model, with an embedding cache; see services/encoder/README.md."""
