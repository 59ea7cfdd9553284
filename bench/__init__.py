"""Benchmarks, run as `xllm bench ...`: clients of the engine or the running system. Services never
import this package."""
