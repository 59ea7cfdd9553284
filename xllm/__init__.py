"""The application entry: the `xllm` command (`cli`) and the single-box launcher (`serve` builds
the children's command lines from the services' config dataclasses, `launcher` supervises them).

None is a service: `xllm serve` starts the services as child processes and supervises them.
"""
