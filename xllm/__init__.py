"""The application entry: the `xllm` command (`cli`) and the single-box launcher (`launcher`).

Neither is a service: `xllm serve` starts the services as child processes and supervises them.
"""
